"""The forward pass of ``k`` clients' copies of one ``nn.Sequential`` model, on
their stacked parameters, written with batched tensor ops instead of ``vmap``.

``torch.func.vmap`` over ``functional_call`` runs any model, but for the
small models of cross-device simulations it costs more than the arithmetic:
every step pays its pytree handling, the parameter swapping of
``functional_call`` and Python decompositions of ops such as ``nll_loss``
(on the digits MLP a batched step of 5 clients took 1.7 ms under ``vmap``
against 0.7 ms written out as below, and one client's ordinary step 0.67 ms).
So for a ``Sequential`` built only from the layers listed here, the
batched backend computes the stacked forward directly:

* ``Linear``: one ``baddbmm`` of the ``(k, out, in)`` stacked weights with the
  transposed ``(k, batch, in)`` activations (in this order the weight gradient
  comes out contiguous, and the optimiser step on it is 2–3× cheaper);
* ``Conv2d``: one grouped convolution, the clients' channels side by side
  (``groups = k · groups``), as ``vmap``'s own batching rule does;
* ``GroupNorm``: the normalisation over ``k · batch`` samples, then each
  client's affine parameters;
* layers without parameters that act on each sample alone (activations,
  pooling, ``Flatten``): applied to the ``(k · batch, …)`` view.

Activations are ``(k, batch, *features)``. Any other layer (or a model that is
not a ``Sequential``) returns ``None`` from :meth:`StackedSequential.of`, and the
backend uses ``vmap``. Either way the backend's probe compares the result with
sequential training before trusting it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]
Layer = Callable[[torch.Tensor, Tensors], torch.Tensor]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardswish,
)
"""Parameter-free layers that act on each element alone: applied to the stacked
activations as they are (exact types: a subclass may override ``forward``)."""

PER_SAMPLE: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
"""Parameter-free layers whose output for a sample depends on that sample
only: applied to the ``(k · batch, …)`` view."""


class StackedSequential:
    """``model(x)`` for ``k`` parameter sets at once: ``self(params, x)`` maps
    ``x`` of shape ``(k, batch, *input)`` and ``params`` (the model's parameter
    names → ``(k, *shape)`` tensors) to ``(k, batch, *output)``."""

    def __init__(self, layers: list[Layer]) -> None:
        self._layers = layers

    @classmethod
    def of(cls, model: nn.Module) -> StackedSequential | None:
        """The stacked form of ``model``, or None when a layer has none here."""
        layers = _layers(model, "")
        return None if layers is None else cls(layers)

    def __call__(self, params: Tensors, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self._layers:
            h = layer(h, params)
        return h


def _layers(module: nn.Module, prefix: str) -> list[Layer] | None:
    if type(module) is not nn.Sequential:
        return None
    layers: list[Layer] = []
    for name, child in module.named_children():
        inner = f"{prefix}{name}."
        if type(child) is nn.Sequential:
            nested = _layers(child, inner)
            if nested is None:
                return None
            layers.extend(nested)
            continue
        layer = _layer(child, inner)
        if layer is None:
            return None
        layers.append(layer)
    return layers


def _layer(module: nn.Module, prefix: str) -> Layer | None:
    if any(True for _ in module.buffers()):
        return None
    if type(module) is nn.Linear:
        return _linear(prefix, module.bias is not None)
    if type(module) is nn.Conv2d:
        return _conv2d(module, prefix) if module.padding_mode == "zeros" else None
    if type(module) is nn.GroupNorm:
        return _group_norm(module, prefix)
    if type(module) is nn.Flatten:
        if module.start_dim == 0 or (module.start_dim < 0 <= module.end_dim):
            return None
        return _flatten(_shifted(module.start_dim), _shifted(module.end_dim))
    if type(module) is nn.Unflatten:
        if not isinstance(module.dim, int) or module.dim == 0:
            return None
        return _unflatten(_shifted(module.dim), tuple(module.unflattened_size))
    if type(module) in ELEMENTWISE:
        return lambda h, params: module(h)
    if type(module) in PER_SAMPLE:
        return _per_sample(module)
    return None


def _shifted(dim: int) -> int:
    """A sample dimension of the model as a dimension of ``(k, batch, …)`` activations."""
    return dim + 1 if dim > 0 else dim


def _flatten(start: int, end: int) -> Layer:
    return lambda h, params: h.flatten(start, end)


def _unflatten(dim: int, sizes: tuple[int, ...]) -> Layer:
    return lambda h, params: h.unflatten(dim, sizes)


def _linear(prefix: str, bias: bool) -> Layer:
    weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"

    def linear(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        w = params[weight_name]
        flat = h if h.dim() == 3 else h.reshape(w.shape[0], -1, h.shape[-1])
        out = (torch.baddbmm(params[bias_name].unsqueeze(2), w, flat.mT) if bias else torch.bmm(w, flat.mT)).mT
        return out if h.dim() == 3 else out.reshape(*h.shape[:-1], w.shape[1])

    return linear


def _conv2d(module: nn.Conv2d, prefix: str) -> Layer:
    weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"
    bias = module.bias is not None
    stride, padding, dilation, groups = module.stride, module.padding, module.dilation, module.groups

    def conv2d(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        w = params[weight_name]
        k, b = h.shape[:2]
        side_by_side = h.transpose(0, 1).reshape(b, k * h.shape[2], *h.shape[3:])
        out = F.conv2d(side_by_side, w.reshape(-1, *w.shape[2:]), params[bias_name].reshape(-1) if bias else None,
                       stride, padding, dilation, groups * k)
        return out.view(b, k, w.shape[1], *out.shape[2:]).transpose(0, 1)

    return conv2d


def _group_norm(module: nn.GroupNorm, prefix: str) -> Layer:
    weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"
    groups, eps, affine = module.num_groups, module.eps, module.affine

    def group_norm(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        out = F.group_norm(h.flatten(0, 1), groups, None, None, eps).view(h.shape)
        if not affine:
            return out
        shape = (h.shape[0], 1, h.shape[2]) + (1,) * (h.dim() - 3)
        return torch.addcmul(params[bias_name].view(shape), out, params[weight_name].view(shape))

    return group_norm


def _per_sample(module: nn.Module) -> Layer:
    def per_sample(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        out = module(h.flatten(0, 1))
        return out.reshape(*h.shape[:2], *out.shape[1:])

    return per_sample
