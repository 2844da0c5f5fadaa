"""FedProx: FedAvg whose clients add the proximal term ``mu/2 ||w - w_global||^2``
to their local loss.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fedtrain import ClientUpdate, RoundPlan, Strategy, UpdateKind, weighted_mean


class FedProx(Strategy):
    """Asks every client for local training with proximal coefficient ``mu``
    (:attr:`fedtrain.RoundPlan.proximal_mu`) and aggregates the deltas as FedAvg:
    ``new = params + server_lr * sum_i w_i Δ_i``. ``mu = 0`` is FedAvg.
    """

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0, weighted: bool = True) -> None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) \
                or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu = {mu!r}: must be a finite number >= 0")
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) \
                or not math.isfinite(server_lr) or server_lr <= 0:
            raise ValueError(f"server_lr = {server_lr!r}: must be a finite number > 0")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted = {weighted!r}: must be true or false")
        self.mu = float(mu)
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def configure(
        self, rnd: int, clients: Sequence[str], rng: np.random.Generator
    ) -> RoundPlan:
        return RoundPlan(clients=tuple(clients), proximal_mu=self.mu)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [u.client_id for u in updates if u.kind != UpdateKind.DELTA]
        if bad:
            raise ValueError(f"FedProx aggregates model deltas; clients {bad} sent another kind")
        return params + self.server_lr * weighted_mean(updates, self.weighted)
