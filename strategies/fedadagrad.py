"""FedAdagrad: Adagrad on the server, applied to the pseudo-gradient ``-Δ``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean


class FedAdagrad(Strategy):
    """Server ``torch.optim.Adagrad(lr=server_lr, eps=tau,
    initial_accumulator_value=0)`` stepped on ``-Δ``, ``Δ`` the weighted mean
    delta: ``v += Δ²; new = params + server_lr * Δ / (sqrt(v) + tau)``.

    Reddi et al. 2021 also keep a first moment (``beta1``); ``torch.optim.Adagrad``
    has none, which is their ``beta1 = 0`` case. The accumulator is kept in
    :meth:`state_dict`.
    """

    def __init__(self, server_lr: float = 0.1, tau: float = 1e-3, weighted: bool = True) -> None:
        for name, value in (("server_lr", server_lr), ("tau", tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a finite number > 0")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted = {weighted!r}: must be true or false")
        self.server_lr, self.tau = float(server_lr), float(tau)
        self.weighted = weighted
        lr, eps = self.server_lr, self.tau
        self._optimizer = ServerOptimizer(
            lambda ps: torch.optim.Adagrad(ps, lr=lr, eps=eps, initial_accumulator_value=0.0)
        )

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [u.client_id for u in updates if u.kind != UpdateKind.DELTA]
        if bad:
            raise ValueError(f"FedAdagrad aggregates model deltas; clients {bad} sent another kind")
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
