"""Sample-level DP on a client: DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") with Opacus' per-sample gradients.

Opacus computes the per-sample gradients (the hard part) and validates the
model; clipping, noise and Poisson sampling of each batch are fedtrain's own
mechanisms (:mod:`fedtrain.privacy.mechanisms`), the same ones DP-FedAvg uses
on the coordinator, so the noise can come from a cryptographic source
(Opacus' own secure mode needs ``torchcsprng``, which is not maintained).
The step is the one of Opacus' ``DPOptimizer``: clip each sample's gradient
to ``max_grad_norm``, sum, add ``N(0, (σ·max_grad_norm)²)``, divide by the
expected batch size ``q·n``.

The loss is not defined here: the training layer above hands its summed batch
loss to :class:`DpSgdStepper` (:data:`BatchLoss`), and the mode probe of
:func:`choose_mode` needs none.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fedtrain.config import ConfigError, GradSampleMode
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.mechanisms import per_sample_clipped_sum
from fedtrain.privacy.noise import NoiseSource

log = logging.getLogger(__name__)

BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, y)``: the summed loss of a batch, whose backward pass gives
each record's gradient unscaled (``loss_reduction="sum"`` for Opacus)."""

MODE_PREFERENCE = (GradSampleMode.EW, GradSampleMode.HOOKS, GradSampleMode.FUNCTORCH)
"""Fastest first, as measured here (``benchmarks/dp_throughput.py``): DP-SGD
costs 6.2–6.8× a plain step with expanded weights, 8–10× with hooks and
12–16× with functorch on the digits MLP; 3.2 / 3.6 / 5.5× on the digits CNN;
1.8 / 1.9 / 2.5× on a CIFAR-shaped CNN."""


@dataclass(frozen=True)
class DpSgdTask:
    """The DP-SGD settings a client trains with in a round."""

    noise_multiplier: float
    max_grad_norm: float
    mode: GradSampleMode
    secure_noise: bool = True


def sample_rate(num_records: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = batch_size / n`` (at most 1) of one client."""
    return min(1.0, batch_size / num_records)


def steps_per_round(num_records: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps one client takes in a round: ``epochs · ceil(n / batch_size)``."""
    return epochs * math.ceil(num_records / batch_size)


def client_event(noise_multiplier: float, num_records: int, batch_size: int, epochs: int) -> GaussianEvent:
    """The privacy event of one client's round of DP-SGD."""
    return GaussianEvent(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate(num_records, batch_size),
        steps=steps_per_round(num_records, batch_size, epochs),
    )


def make_private_model(model: nn.Module, fix: bool) -> nn.Module:
    """The model itself when Opacus can compute its per-sample gradients.

    Otherwise, with ``fix`` the unsupported layers are replaced
    (``ModuleValidator.fix``: BatchNorm → GroupNorm) and the change is logged;
    without it a ``ConfigError`` names each layer and the fix. A model with
    gradient checkpointing on is refused: its blocks recompute their forward
    pass inside the backward one, where Opacus captures no activations (the
    per-sample gradients come out missing, or the recomputation fails).
    """
    from opacus.validators import ModuleValidator

    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ConfigError(
            "client.grad_checkpointing = true with privacy.mode = 'sample': Opacus computes no per-sample "
            "gradients through checkpointed blocks; set client.grad_checkpointing = false"
        )

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    if fix:
        fixed = ModuleValidator.fix(model)
        log.warning("privacy.fix_model: replaced layers Opacus cannot make private: %s", errors)
        return fixed
    details = "; ".join(str(e) for e in errors)
    raise ConfigError(
        f"privacy.mode = 'sample': the model has layers DP-SGD cannot use: {details}. "
        "Replace BatchNorm with GroupNorm (or set privacy.fix_model = true to do it automatically)"
    )


def _wrap(model: nn.Module, mode: GradSampleMode) -> nn.Module:
    from opacus import GradSampleModule
    from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

    if mode is GradSampleMode.EW:
        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="sum")
    return GradSampleModule(
        model, batch_first=True, loss_reduction="sum", force_functorch=mode is GradSampleMode.FUNCTORCH
    )


def choose_mode(model: nn.Module, requested: GradSampleMode, example: torch.Tensor) -> GradSampleMode:
    """``requested``, or for ``auto`` the fastest mode that computes correct
    per-sample gradients for ``model`` on ``example`` (a batch of 2 inputs).
    Only the trainable parameters count: a frozen one (a LoRA model's base)
    gets no per-sample gradient in any mode, and needs none."""
    if requested is not GradSampleMode.AUTO:
        return requested
    for mode in MODE_PREFERENCE:
        wrapped: nn.Module | None = None
        try:
            wrapped = _wrap(model, mode)
            gradients = _per_sample_grads(wrapped, model, example)
            supported = all(g is not None and g.shape[0] == len(example) for g in gradients)
        except Exception as exc:  # an unsupported layer shows up as any error
            log.info("grad_sample_mode %s unsupported for this model: %s", mode.value, exc)
            supported = False
        finally:
            if wrapped is not None:
                wrapped.remove_hooks()
            for p in model.parameters():
                p.grad = None
                p.grad_sample = None
        if supported:
            return mode
    raise ConfigError("privacy.grad_sample_mode = 'auto': no Opacus mode supports this model")


def _per_sample_grads(wrapped: nn.Module, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    """Each trainable parameter's per-sample gradients through ``wrapped``, of
    the sum of every record's output at the class ``model`` predicts for it.
    Whether a mode computes them depends on the layers, not on the loss, so
    the probe needs no training loss, only a scalar that every record's
    output reaches."""
    with torch.no_grad():
        predicted = model(x).argmax(dim=1, keepdim=True)
    wrapped(x).gather(1, predicted).sum().backward()
    return [getattr(p, "grad_sample", None) for p in model.parameters() if p.requires_grad]


class DpSgdStepper:
    """Per-sample gradients of one model through Opacus, wrapped once per mode,
    of the batch loss ``loss`` (summed over the batch's records)."""

    def __init__(self, model: nn.Module, loss: BatchLoss) -> None:
        self.model = model
        self.loss = loss
        self._wrapped: dict[GradSampleMode, nn.Module] = {}

    def _module(self, mode: GradSampleMode) -> nn.Module:
        if mode not in self._wrapped:
            if self._wrapped:
                raise ValueError("one model can be wrapped for one grad_sample_mode only")
            self._wrapped[mode] = _wrap(self.model, mode)
        return self._wrapped[mode]

    def noisy_gradient(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        expected_batch: float,
        task: DpSgdTask,
        noise: NoiseSource,
    ) -> float:
        """Set each parameter's ``.grad`` to the DP-SGD gradient of batch
        ``(x, y)`` (possibly empty); returns the batch's summed loss."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum = 0.0
        if len(y) > 0:
            for p in params:
                p.grad_sample = None
            loss = self.loss(self._module(task.mode)(x), y)
            loss.backward()
            summed, _ = per_sample_clipped_sum([p.grad_sample for p in params], task.max_grad_norm)
            loss_sum = float(loss.detach())
        else:
            summed = [torch.zeros_like(p) for p in params]
        total = sum(p.numel() for p in params)
        flat_noise = noise.gaussian(total, task.noise_multiplier * task.max_grad_norm, params[0].device)
        for p, s, n in zip(params, summed, torch.split(flat_noise, [p.numel() for p in params])):
            p.grad = (s + n.view_as(s)) / expected_batch
            p.grad_sample = None
        return loss_sum
