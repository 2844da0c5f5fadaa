"""FedProx: FedAvg whose clients add the proximal term ``mu/2 ||w - w_global||^2``
to their local loss.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedtrain import ClientUpdate, RoundPlan, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, non_negative, positive, require_kind


class FedProx(Strategy):
    """Asks every client for local training with proximal coefficient ``mu``
    (:attr:`fedtrain.RoundPlan.proximal_mu`) and aggregates the deltas as FedAvg:
    ``new = params + server_lr * sum_i w_i Δ_i``. ``mu = 0`` is FedAvg.
    """

    needs_individual_updates = False

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0, weighted: bool = True) -> None:
        self.mu = non_negative("mu", mu)
        self.server_lr = positive("server_lr", server_lr)
        self.weighted = flag("weighted", weighted)

    def configure(
        self, rnd: int, clients: Sequence[str], rng: np.random.Generator
    ) -> RoundPlan:
        return RoundPlan(clients=tuple(clients), proximal_mu=self.mu)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedProx", updates, UpdateKind.DELTA)
        return params + self.server_lr * weighted_mean(updates, self.weighted)
