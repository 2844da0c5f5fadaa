"""Krum and Multi-Krum: keep the updates closest to their neighbours.

Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent" (NeurIPS).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedtrain import ClientUpdate, Strategy, UpdateKind, stack
from fedtrain import integer, require_kind


def krum_scores(matrix: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Each row's Krum score: the sum of squared distances to its
    ``n − f − 2`` nearest other rows (at least 1, at most ``n − 1``), float64.

    Distances use the Gram trick ``|a|² + |b|² − 2a·b`` (one matrix product) on
    rows centred on their mean, which leaves distances unchanged and avoids most
    of the cancellation when the updates lie close together far from 0.
    """
    n = matrix.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64, device=matrix.device)
    centred = matrix - matrix.mean(dim=0, keepdim=True)
    gram = (centred @ centred.T).to(torch.float64)
    norms = gram.diagonal()
    dist = (norms[:, None] + norms[None, :] - 2 * gram).clamp_(min=0)
    dist.fill_diagonal_(float("inf"))
    k = min(max(n - num_byzantine - 2, 1), n - 1)
    return torch.sort(dist, dim=1).values[:, :k].sum(dim=1)


class Krum(Strategy):
    """``new = params + Δ_j`` for the single update ``j`` with the lowest Krum
    score, tolerating up to ``num_byzantine`` (``f``) adversarial clients.

    The guarantee of Blanchard et al. needs ``n > 2f + 2``; with fewer updates
    the neighbour count ``n − f − 2`` is clamped to at least 1, so Krum still
    returns one of the updates. Exact ties in the computed scores go to the
    earliest update.
    """

    needs_individual_updates = True

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = integer("num_byzantine", num_byzantine, 0)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("Krum", updates, UpdateKind.DELTA)
        matrix = stack(updates)
        best = int(torch.argmin(krum_scores(matrix, self.num_byzantine)))
        return params + matrix[best]


class MultiKrum(Strategy):
    """``new = params + mean of the m updates with the lowest Krum scores``
    (unweighted), ``m = num_selected`` or by default ``n − num_byzantine``,
    clamped to ``[1, n]``. ``m = n`` is the plain mean, ``m = 1`` is Krum.
    """

    needs_individual_updates = True

    def __init__(self, num_byzantine: int = 0, num_selected: int | None = None) -> None:
        self.num_byzantine = integer("num_byzantine", num_byzantine, 0)
        self.num_selected = None if num_selected is None else integer(
            "num_selected", num_selected, 1)

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        require_kind("MultiKrum", updates, UpdateKind.DELTA)
        matrix = stack(updates)
        n = matrix.shape[0]
        m = self.num_selected if self.num_selected is not None else n - self.num_byzantine
        m = min(max(m, 1), n)
        if m == n:
            return params + matrix.mean(dim=0)
        scores = krum_scores(matrix, self.num_byzantine)
        chosen = torch.sort(torch.argsort(scores, stable=True)[:m]).values
        return params + matrix[chosen].mean(dim=0)
