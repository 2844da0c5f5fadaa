"""FedAvg: weighted averaging of model deltas.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedtrain import ClientUpdate, Strategy, UpdateKind, weighted_mean
from fedtrain import flag, positive, require_kind


class FedAvg(Strategy):
    """``new = params + server_lr * sum_i w_i Δ_i`` with ``w_i`` proportional to
    each client's ``num_examples`` (or equal weights when ``weighted=False``).

    ``server_lr = 1`` is the FedAvg of McMahan et al. 2017; other values are the
    server learning rate of Reddi et al. 2021 (FedAvg = server SGD on ``-Δ``).
    """

    needs_individual_updates = False

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        self.server_lr = positive("server_lr", server_lr)
        self.weighted = flag("weighted", weighted)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedAvg", updates, UpdateKind.DELTA)
        return params + self.server_lr * weighted_mean(updates, self.weighted)
