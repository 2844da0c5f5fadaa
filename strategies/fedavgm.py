"""FedAvgM: FedAvg with server momentum.

Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (arXiv:1909.06335). Server SGD with momentum on
the pseudo-gradient ``-Δ``, as in Reddi et al. 2021, "Adaptive Federated
Optimization" (ICLR).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fedtrain import ClientUpdate, ServerOptimizer, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, fraction, positive, require_kind


class FedAvgM(Strategy):
    """``v = momentum * v + Δ; new = params + server_lr * v`` where ``Δ`` is the
    weighted mean delta (``torch.optim.SGD`` with momentum on ``-Δ``). The
    momentum buffer is kept in :meth:`state_dict`.
    """

    needs_individual_updates = False

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True
    ) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.momentum = fraction("momentum", momentum)
        self.weighted = flag("weighted", weighted)
        lr, mom = self.server_lr, self.momentum
        self._optimizer = ServerOptimizer(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mom))

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedAvgM", updates, UpdateKind.DELTA)
        return self._optimizer.step(params, weighted_mean(updates, self.weighted))

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._optimizer.load_state_dict(state)
