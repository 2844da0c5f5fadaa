"""FedSGD: one server gradient step on the clients' mean gradient.

The FedSGD baseline of McMahan et al. 2017, "Communication-Efficient Learning
of Deep Networks from Decentralized Data" (AISTATS).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedtrain import ClientUpdate, RoundPlan, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, positive


class FedSGD(Strategy):
    """Asks every client for the mean gradient at the global model
    (:attr:`fedtrain.UpdateKind.GRADIENT`, no local step) and applies
    ``new = params − server_lr * sum_i w_i g_i``, ``w_i`` proportional to
    ``num_examples`` (the full-batch gradient over the cohort's data) or equal
    when ``weighted=False``.
    """

    needs_individual_updates = False

    def __init__(self, server_lr: float = 0.1, weighted: bool = True) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.weighted = flag("weighted", weighted)

    def configure(
        self, rnd: int, clients: Sequence[str], rng: np.random.Generator
    ) -> RoundPlan:
        return RoundPlan(clients=tuple(clients), kind=UpdateKind.GRADIENT)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [f"{u.client_id} ({UpdateKind(u.kind).value})" for u in updates
               if u.kind != UpdateKind.GRADIENT]
        if bad:
            raise ValueError(f"FedSGD aggregates gradients; got other kinds from {bad}")
        return params - self.server_lr * weighted_mean(updates, self.weighted)
