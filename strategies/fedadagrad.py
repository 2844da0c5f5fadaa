"""FedAdagrad: Adagrad on the server, applied to the pseudo-gradient ``-Δ``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, positive, require_kind


class FedAdagrad(Strategy):
    """Server ``torch.optim.Adagrad(lr=server_lr, eps=tau,
    initial_accumulator_value=0)`` stepped on ``-Δ``, ``Δ`` the weighted mean
    delta: ``v += Δ²; new = params + server_lr * Δ / (sqrt(v) + tau)``.

    Reddi et al. 2021 also keep a first moment (``beta1``); ``torch.optim.Adagrad``
    has none, which is their ``beta1 = 0`` case. The accumulator is kept in
    :meth:`state_dict`.
    """

    needs_individual_updates = False

    def __init__(self, server_lr: float = 0.1, tau: float = 1e-3, weighted: bool = True) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.tau = positive("tau", tau)
        self.weighted = flag("weighted", weighted)
        lr, eps = self.server_lr, self.tau
        self._optimizer = ServerOptimizer(
            lambda ps: torch.optim.Adagrad(ps, lr=lr, eps=eps, initial_accumulator_value=0.0)
        )

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedAdagrad", updates, UpdateKind.DELTA)
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
