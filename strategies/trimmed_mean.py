"""Coordinate-wise trimmed mean of the client deltas.

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedtrain import ClientUpdate, Strategy, UpdateKind, stack
from fedtrain import fraction, require_kind


class TrimmedMean(Strategy):
    """Per coordinate, drop the ``k = ⌊beta·n⌋`` largest and ``k`` smallest of
    the ``n`` deltas and average the rest: ``new = params + trimmed mean``.

    Since ``beta < 0.5``, ``2k < n`` and at least one value always remains
    (with ``n = 1`` nothing is trimmed). ``beta = 0`` is the unweighted mean.
    ``num_examples`` is ignored, as in every robust aggregate.
    """

    needs_individual_updates = True

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = fraction("beta", beta, upper=0.5)

    def num_trimmed(self, n: int) -> int:
        """How many values are dropped at each end out of ``n``."""
        # The epsilon keeps e.g. 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 =
        # 28.999999999999996 from flooring the wrong way; the min keeps one value.
        return min(math.floor(self.beta * n + 1e-9), (n - 1) // 2)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("TrimmedMean", updates, UpdateKind.DELTA)
        matrix = stack(updates)
        n = matrix.shape[0]
        k = self.num_trimmed(n)
        if k == 0:
            return params + matrix.mean(dim=0)
        kept = torch.sort(matrix, dim=0).values[k : n - k]
        return params + kept.mean(dim=0)
