"""The forward pass of ``k`` clients' copies of one ``nn.Sequential`` model, on
their stacked parameters, written with batched tensor ops instead of ``vmap``.

``torch.func.vmap`` over ``functional_call`` runs any model, but for the
small models of cross-device simulations it costs more than the arithmetic:
every step pays its pytree handling, the parameter swapping of
``functional_call`` and Python decompositions of ops such as ``nll_loss``
(on the digits MLP a batched step of 5 clients took 1.7 ms under ``vmap``
against 0.7 ms written out as below, and one client's ordinary step 0.67 ms).
So for a ``Sequential`` built only from the layers listed here, the
batched executor computes the stacked forward directly:

* ``Linear``: one ``baddbmm`` of the ``(k, batch, in)`` activations with the
  transposed ``(k, out, in)`` stacked weights;
* ``Conv2d``: one grouped convolution, the clients' channels side by side
  (``groups = k · groups``), as ``vmap``'s own batching rule does;
* ``GroupNorm``: the normalisation over ``k · batch`` samples, then each
  client's affine parameters;
* layers without parameters that act on each sample alone (activations,
  pooling, ``Flatten``): applied to the ``(k · batch, …)`` view.

Activations are ``(k, batch, *features)``. Any other layer (or a model that is
not a ``Sequential``) returns ``None`` from :meth:`StackedSequential.of`, and the
executor uses ``vmap``. Either way the executor's probe compares the result with
sequential training before trusting it.

When every layer is a ``Linear``, ``Flatten`` / ``Unflatten`` or one of the
activations of :data:`DIFFERENTIABLE` (an MLP, a logistic regression),
:meth:`StackedSequential.gradients` also computes the cross-entropy gradients
by hand, with the chain rule written out and aten's own backward kernels for the
activations: a Linear's weight gradient is one ``bmm``, its bias gradient one
sum. Autograd records the same ~15 kernels, but building and walking its graph
costs more than they do at this size (a stacked step of 5 digits-MLP clients:
0.19 ms against 0.44 ms through ``torch.autograd.grad``, 1 thread), and a
cross-device round is a handful of such steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]
Forward = Callable[[torch.Tensor, Tensors], torch.Tensor]
InputGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Tensors], torch.Tensor]
"""``input_grad(grad_out, input, output, params)``: the gradient of the loss
with respect to the layer's input."""
ParamGrads = Callable[[torch.Tensor, torch.Tensor, Tensors, Tensors], None]
"""``param_grads(grad_out, input, params, grads)``: writes the gradients of the
layer's parameters into ``grads``, by parameter name."""


@dataclass(frozen=True)
class Layer:
    """One layer of the stacked model: its forward pass and, when written out
    here, its backward pass (``input_grad`` None: none; ``param_grads`` None:
    no parameters)."""

    forward: Forward
    input_grad: InputGrad | None = None
    param_grads: ParamGrads | None = None

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

DIFFERENTIABLE: dict[type[nn.Module], Callable[[nn.Module], InputGrad]] = {
    nn.Identity: lambda m: lambda g, x, out, params: g,
    nn.ReLU: lambda m: lambda g, x, out, params: torch.ops.aten.threshold_backward(g, out, 0),
    nn.Tanh: lambda m: lambda g, x, out, params: torch.ops.aten.tanh_backward(g, out),
    nn.Sigmoid: lambda m: lambda g, x, out, params: torch.ops.aten.sigmoid_backward(g, out),
    nn.SiLU: lambda m: lambda g, x, out, params: torch.ops.aten.silu_backward(g, x),
    nn.GELU: lambda m: lambda g, x, out, params: torch.ops.aten.gelu_backward(g, x, approximate=m.approximate),
    nn.LeakyReLU: lambda m: lambda g, x, out, params: torch.ops.aten.leaky_relu_backward(
        g, x, m.negative_slope, False),
}
"""Elementwise activations whose backward is written out: each maps to aten's
own backward kernel, the one autograd would call. Activations outside this
table keep autograd."""


class StackedSequential:
    """``model(x)`` for ``k`` parameter sets at once: ``self(params, x)`` maps
    ``x`` of shape ``(k, batch, *input)`` and ``params`` (the model's parameter
    names → ``(k, *shape)`` tensors) to ``(k, batch, *output)``."""

    def __init__(self, layers: list[Layer]) -> None:
        self._layers = layers
        self.differentiable = all(layer.input_grad is not None for layer in layers)
        """Whether :meth:`gradients` can run (every layer's backward is written out)."""

    @classmethod
    def of(cls, model: nn.Module) -> StackedSequential | None:
        """The stacked form of ``model``, or None when a layer has none here."""
        layers = _layers(model, "")
        return None if layers is None else cls(layers)

    def __call__(self, params: Tensors, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self._layers:
            h = layer.forward(h, params)
        return h

    def gradients(
        self, params: Tensors, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
    ) -> tuple[Tensors, torch.Tensor]:
        """The gradient of ``sum(weight · cross_entropy(self(params, x), y))``
        with respect to every parameter, without autograd; and every record's
        loss. ``y`` and ``weight`` are ``(k, batch)``; the output must be
        ``(k, batch, classes)``. Each client's loss depends on its own
        parameters only, so row ``i`` of a gradient is client ``i``'s gradient
        of its own weighted loss."""
        if not self.differentiable:
            raise ValueError("a layer of this model has no written-out backward pass")
        inputs = [x]
        for layer in self._layers:
            inputs.append(layer.forward(inputs[-1], params))
        logits = inputs[-1]
        if logits.dim() != 3:
            raise ValueError(f"gradients: the model's output has shape {tuple(logits.shape[1:])} per client, "
                             "expected (batch, classes)")
        losses, g = _cross_entropy_backward(logits, y, weight)
        grads: Tensors = {}
        first = next((i for i, layer in enumerate(self._layers) if layer.param_grads is not None), len(self._layers))
        for i in range(len(self._layers) - 1, first - 1, -1):
            layer = self._layers[i]
            if layer.param_grads is not None:
                layer.param_grads(g, inputs[i], params, grads)
            if i > first:
                g = layer.input_grad(g, inputs[i], inputs[i + 1], params)  # type: ignore[misc]
        return grads, losses


def _cross_entropy_backward(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every record's cross-entropy and the gradient of ``sum(weight · ce)``
    with respect to the logits: ``weight · (softmax − one_hot(y))``."""
    log_p = logits.log_softmax(2)
    picked = y.unsqueeze(2)
    losses = log_p.gather(2, picked).squeeze(2).neg_()
    w = weight.unsqueeze(2)
    minus_one_hot = torch.zeros_like(log_p).scatter_(2, picked, w).neg_()
    return losses, torch.addcmul(minus_one_hot, log_p.exp_(), w)


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
        return _reshape(lambda h: h.flatten(_shifted(module.start_dim), _shifted(module.end_dim)))
    if type(module) is nn.Unflatten:
        if not isinstance(module.dim, int) or module.dim == 0:
            return None
        dim, sizes = _shifted(module.dim), tuple(module.unflattened_size)
        return _reshape(lambda h: h.unflatten(dim, sizes))
    if type(module) in ELEMENTWISE:
        return _elementwise(module)
    if type(module) in PER_SAMPLE:
        return _per_sample(module)
    return None


def _shifted(dim: int) -> int:
    """A sample dimension of the model as a dimension of ``(k, batch, …)`` activations."""
    return dim + 1 if dim > 0 else dim


def _reshape(reshape: Callable[[torch.Tensor], torch.Tensor]) -> Layer:
    return Layer(lambda h, params: reshape(h), lambda g, x, out, params: g.reshape(x.shape))


def _elementwise(module: nn.Module) -> Layer:
    """An activation; written-out backward from :data:`DIFFERENTIABLE`, except
    in place (the input it needs is overwritten; ReLU's needs only the output).
    ``forward`` is called directly: like the other layers here, the stacked pass
    runs no module hooks."""
    backward = DIFFERENTIABLE.get(type(module))
    if backward is not None and getattr(module, "inplace", False) and type(module) is not nn.ReLU:
        backward = None
    return Layer(lambda h, params: module.forward(h), None if backward is None else backward(module))


def _linear(prefix: str, bias: bool) -> Layer:
    weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"

    def as_3d(h: torch.Tensor, k: int) -> torch.Tensor:
        return h if h.dim() == 3 else h.reshape(k, -1, h.shape[-1])

    def forward(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        w = params[weight_name]
        flat = as_3d(h, w.shape[0])
        out = torch.baddbmm(params[bias_name].unsqueeze(1), flat, w.mT) if bias else torch.bmm(flat, w.mT)
        return out if h.dim() == 3 else out.reshape(*h.shape[:-1], w.shape[1])

    def input_grad(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, params: Tensors) -> torch.Tensor:
        w = params[weight_name]
        grad = torch.bmm(as_3d(g, w.shape[0]), w)
        return grad if x.dim() == 3 else grad.reshape(x.shape)

    def param_grads(g: torch.Tensor, x: torch.Tensor, params: Tensors, grads: Tensors) -> None:
        k = params[weight_name].shape[0]
        g3 = as_3d(g, k)
        grads[weight_name] = torch.bmm(g3.mT, as_3d(x, k))
        if bias:
            grads[bias_name] = g3.sum(1)

    return Layer(forward, input_grad, param_grads)


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

    return Layer(conv2d)


def _group_norm(module: nn.GroupNorm, prefix: str) -> Layer:
    weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"
    groups, eps, affine = module.num_groups, module.eps, module.affine

    def group_norm(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        out = F.group_norm(h.flatten(0, 1), groups, None, None, eps).view(h.shape)
        if not affine:
            return out
        shape = (h.shape[0], 1, h.shape[2]) + (1,) * (h.dim() - 3)
        return torch.addcmul(params[bias_name].view(shape), out, params[weight_name].view(shape))

    return Layer(group_norm)


def _per_sample(module: nn.Module) -> Layer:
    def per_sample(h: torch.Tensor, params: Tensors) -> torch.Tensor:
        out = module(h.flatten(0, 1))
        return out.reshape(*h.shape[:2], *out.shape[1:])

    return Layer(per_sample)
