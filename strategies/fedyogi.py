"""FedYogi: Yogi on the server, applied to the pseudo-gradient ``-Δ``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2; the
Yogi update is from Zaheer et al. 2018, "Adaptive Methods for Nonconvex
Optimization" (NeurIPS). ``torch.optim`` has no Yogi, so :class:`Yogi` below is
hand-written.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, fraction, positive, require_kind


class Yogi(torch.optim.Optimizer):
    """The Yogi optimiser (Zaheer et al. 2018), hand-written because
    ``torch.optim`` lacks it. Per step, with gradient ``g``::

        m ← β1·m + (1 − β1)·g
        v ← v − (1 − β2)·g²·sign(v − g²)
        p ← p − lr·m / (sqrt(v) + eps)

    Like Algorithm 2 of Reddi et al. 2021 there is no bias correction; ``m``
    starts at 0 and ``v`` at ``initial_accumulator`` (Reddi et al. take
    ``v ≥ τ²``). Unlike Adam's, ``v`` changes additively and only by the sign of
    ``v − g²``, so the effective learning rate cannot collapse after one large
    gradient.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator: float = 1e-6,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr = {lr!r}: must be > 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas = {betas!r}: both must be in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps = {eps!r}: must be > 0")
        if not initial_accumulator >= 0:
            raise ValueError(f"initial_accumulator = {initial_accumulator!r}: must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, initial_accumulator=initial_accumulator)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_accumulator"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g2 = g * g
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


class FedYogi(Strategy):
    """Server :class:`Yogi` (``lr=server_lr, betas=(beta1, beta2), eps=tau``,
    ``v`` starting at ``tau²``) stepped on ``-Δ``, ``Δ`` the weighted mean
    delta (Reddi et al. 2021). The moments are kept in :meth:`state_dict`.
    """

    needs_individual_updates = False

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.tau = positive("tau", tau)
        self.beta1 = fraction("beta1", beta1)
        self.beta2 = fraction("beta2", beta2)
        self.weighted = flag("weighted", weighted)
        lr, betas, eps = self.server_lr, (self.beta1, self.beta2), self.tau
        self._optimizer = ServerOptimizer(
            lambda ps: Yogi(ps, lr=lr, betas=betas, eps=eps, initial_accumulator=eps * eps)
        )

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedYogi", updates, UpdateKind.DELTA)
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
