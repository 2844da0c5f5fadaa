"""A client's SGD or Adam, bit-identical to ``torch.optim``'s, without its compile machinery.

:func:`sgd_step_` and :func:`adam_step_` are the one SGD and the one Adam
update of the training layer: :class:`LocalOptimizer` runs them on a model's
parameters, the batched engine (:mod:`fedtrain.training.batched`) on the
stacked parameters of a cohort, whose rows are the clients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

from fedtrain.config import Optimizer
from fedtrain.training.train_task import TrainTask


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s defaults, which :func:`adam_step_` uses."""


def _scalar_dtype() -> torch.dtype:
    """The dtype of Adam's step count, as ``torch.optim.Adam`` chooses it (unfused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def adam_step_count() -> torch.Tensor:
    """A fresh Adam step count (0), one per parameter tensor: :func:`adam_step_` increments it."""
    return torch.tensor(0.0, dtype=_scalar_dtype())


@torch.no_grad()
def sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor | None] | list[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One SGD update of ``params`` in place, as ``torch.optim.SGD`` (no
    dampening, no Nesterov) computes it, through its functional
    ``torch.optim.sgd.sgd``. With ``momentum`` the buffers are updated in
    place, and a ``None`` buffer is replaced in the list by the first step's
    (the gradient, as a zero buffer would give); without it ``buffers`` is not
    read."""
    sgd_update(
        params, grads, buffers,
        has_sparse_grad=any(g.is_sparse for g in grads), foreach=None, fused=None,
        weight_decay=weight_decay, momentum=momentum, lr=lr,
        dampening=0, nesterov=False, maximize=False,
    )


@torch.no_grad()
def adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    weight_decay: float,
) -> None:
    """One Adam update of ``params`` in place, as ``torch.optim.Adam`` with
    :data:`ADAM_BETAS` and :data:`ADAM_EPS` computes it, through its functional
    ``torch.optim.adam.adam``: the moments and each tensor's step count
    (:func:`adam_step_count`) are updated in place."""
    if any(g.is_sparse for g in grads):
        raise ValueError("Adam does not support sparse gradients")
    beta1, beta2 = ADAM_BETAS
    adam_update(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        foreach=None, capturable=False, differentiable=False, fused=None,
        has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=False,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
        eps=ADAM_EPS, maximize=False,
    )


class LocalOptimizer:
    """A client's SGD or Adam, exactly as ``torch.optim.SGD`` / ``torch.optim.Adam``
    (with their defaults) compute it: ``step`` calls the functional update that
    those classes' ``step`` calls (``torch.optim.sgd.sgd`` /
    ``torch.optim.adam.adam``, which pick the same single-tensor or foreach
    kernel) on the parameters that have a gradient, and keeps the same state
    (momentum buffers; Adam's step count and moments), so the updates are
    bit-identical.

    The optimiser classes themselves are not used: their constructor, ``step``
    and ``zero_grad`` are wrapped to disable ``torch.compile``, and the first
    call of any of them imports ``torch._dynamo``, which costs more start-up
    than a short simulation's whole training. Nothing here compiles.
    """

    def __init__(self, params: list[nn.Parameter], task: TrainTask) -> None:
        if not params:
            raise ValueError("the model has no parameters to optimise")
        self.params = params
        self.kind = task.optimizer
        self.lr = task.lr
        self.momentum = task.momentum
        self.weight_decay = task.weight_decay
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget the momentum / moments: the next step is a first step."""
        self.state.clear()

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, torch's default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if self.kind is Optimizer.ADAM:
            self._adam(params, grads)
        else:
            self._sgd(params, grads)

    def _sgd(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params] if self.momentum else []
        sgd_step_(params, grads, buffers, self.lr, self.momentum, self.weight_decay)
        for p, buffer in zip(params, buffers):
            self.state[p] = {"momentum_buffer": buffer}

    def _adam(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        for p in params:
            if p not in self.state:
                self.state[p] = {
                    "step": adam_step_count(),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        states = [self.state[p] for p in params]
        adam_step_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], self.lr, self.weight_decay,
        )
