"""FedMedian: the coordinate-wise median of the client deltas.

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedtrain import ClientUpdate, Strategy, UpdateKind, stack
from fedtrain import require_kind


class FedMedian(Strategy):
    """``new = params + median_i Δ_i`` per coordinate; for an even number of
    updates the two middle values are averaged. ``num_examples`` is ignored:
    a robust statistic must not let one client buy influence with a large count.
    """

    needs_individual_updates = True

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("FedMedian", updates, UpdateKind.DELTA)
        ordered = torch.sort(stack(updates), dim=0).values
        n = ordered.shape[0]
        if n % 2:
            median = ordered[n // 2]
        else:
            median = (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        return params + median
