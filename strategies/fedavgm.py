"""FedAvgM: FedAvg with server momentum.

Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (arXiv:1909.06335). Server SGD with momentum on
the pseudo-gradient ``-Δ``, as in Reddi et al. 2021, "Adaptive Federated
Optimization" (ICLR).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean


class FedAvgM(Strategy):
    """``v = momentum * v + Δ; new = params + server_lr * v`` where ``Δ`` is the
    weighted mean delta (``torch.optim.SGD`` with momentum on ``-Δ``). The
    momentum buffer is kept in :meth:`state_dict`.
    """

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True
    ) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) \
                or not math.isfinite(server_lr) or server_lr <= 0:
            raise ValueError(f"server_lr = {server_lr!r}: must be a finite number > 0")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0 <= momentum < 1:
            raise ValueError(f"momentum = {momentum!r}: must be in [0, 1)")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted = {weighted!r}: must be true or false")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.weighted = weighted
        lr, mom = self.server_lr, self.momentum
        self._optimizer = ServerOptimizer(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mom))

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [u.client_id for u in updates if u.kind != UpdateKind.DELTA]
        if bad:
            raise ValueError(f"FedAvgM aggregates model deltas; clients {bad} sent another kind")
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
