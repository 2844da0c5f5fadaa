"""FedAvg: weighted averaging of model deltas.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedtrain import ClientUpdate, Strategy, UpdateKind, weighted_mean


class FedAvg(Strategy):
    """``new = params + server_lr * sum_i w_i Δ_i`` with ``w_i`` proportional to
    each client's ``num_examples`` (or equal weights when ``weighted=False``).

    ``server_lr = 1`` is the FedAvg of McMahan et al. 2017; other values are the
    server learning rate of Reddi et al. 2021 (FedAvg = server SGD on ``-Δ``).
    """

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) \
                or not math.isfinite(server_lr) or server_lr <= 0:
            raise ValueError(f"server_lr = {server_lr!r}: must be a finite number > 0")
        if not isinstance(weighted, bool):
            raise ValueError(f"weighted = {weighted!r}: must be true or false")
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        bad = [u.client_id for u in updates if u.kind != UpdateKind.DELTA]
        if bad:
            raise ValueError(f"FedAvg aggregates model deltas; clients {bad} sent another kind")
        return params + self.server_lr * weighted_mean(updates, self.weighted)
