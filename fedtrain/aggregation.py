"""Reductions over client updates: the hot path of every round.

The fastest weighted sum on a CPU is one matrix-vector product ``w @ X`` over
updates that already sit in one stacked, preallocated buffer (measured here:
~25 GB/s on one core, against ~14 GB/s for a loop of ``add_``). The local
executor writes each client's update straight into a row of such a buffer, so
:func:`stack` usually returns a view and costs nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientUpdate, UpdateKind

FOLD_BUDGET_BYTES = 64 * 2**20
"""The most bytes of update rows an :class:`UpdateFold` holds at once
(64 MiB; at least one row, whatever the model's size). ``w @ X`` over a few
rows of one buffer already reaches the one-core reduction speed measured here
(~25 GB/s), so a larger buffer buys no speed, only memory: with it,
coordinator memory stays O(model) however large the cohort. Every cohort of
a model under 16M / cohort parameters fits one buffer, where the fold is bit
for bit the unfolded reduction."""


def _rows_of_one_buffer(vectors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    first = vectors[0]
    if first.dim() != 1 or first.stride() != (1,):
        return None
    size = first.numel()
    base_ptr = first.untyped_storage().data_ptr()
    base_offset = first.storage_offset()
    for i, v in enumerate(vectors):
        if (
            v.dim() != 1
            or v.stride() != (1,)
            or v.numel() != size
            or v.dtype != first.dtype
            or v.device != first.device
            or v.untyped_storage().data_ptr() != base_ptr
            or v.storage_offset() != base_offset + i * size
        ):
            return None
    return first.as_strided((len(vectors), size), (size, 1), base_offset)


def stack(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """The update vectors as an ``(n, P)`` matrix: a view when they are
    consecutive rows of one buffer, a fresh stack otherwise."""
    if not updates:
        raise ValueError("cannot stack an empty list of updates")
    vectors = [u.vector for u in updates]
    view = _rows_of_one_buffer(vectors)
    return view if view is not None else torch.stack(vectors)


def example_weights(updates: Sequence[ClientUpdate], weighted: bool = True) -> torch.Tensor:
    """Normalised aggregation weights: by ``num_examples`` (FedAvg) or equal."""
    if not updates:
        raise ValueError("no updates to weigh")
    if weighted:
        counts = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    else:
        counts = torch.ones(len(updates), dtype=torch.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"total weight must be positive, got {float(total)}")
    return (counts / total).to(updates[0].vector.dtype).to(updates[0].vector.device)


def _weighted_sum(vectors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    view = _rows_of_one_buffer(vectors)
    if view is not None:
        return weights @ view
    out = vectors[0] * weights[0]
    for w, v in zip(weights[1:].tolist(), vectors[1:]):
        out.add_(v, alpha=w)
    return out


def weighted_mean(updates: Sequence[ClientUpdate], weighted: bool = True) -> torch.Tensor:
    """``sum_i w_i u_i`` with weights from :func:`example_weights`: one ``w @ X``
    over the rows of one buffer, else an accumulation that never stacks (a
    fresh ``(n, P)`` stack costs a page-faulting allocation and a second read)."""
    return _weighted_sum([u.vector for u in updates], example_weights(updates, weighted))


class Reduction(str, enum.Enum):
    """What an :class:`UpdateFold` computes from the updates it folds.

    ``WEIGHTED_MEAN``: weights ``num_examples`` (FedAvg's); ``MEAN``: equal
    weights (a strategy with ``weighted = False``); ``SUM``: the unit-weight
    sum, not divided (user-level DP divides by the expected cohort itself).
    """

    WEIGHTED_MEAN = "weighted-mean"
    MEAN = "mean"
    SUM = "sum"


def strategy_reduction(needs_individual_updates: bool, weighted: bool) -> Reduction | None:
    """The fold that stands for a strategy's own reduction, or None for a
    strategy that looks at each update on its own (median, trimmed mean,
    Krum: it gets every update)."""
    if needs_individual_updates:
        return None
    return Reduction.WEIGHTED_MEAN if weighted else Reduction.MEAN


def fold_capacity(cohort: int, numel: int, budget: int = FOLD_BUDGET_BYTES) -> int:
    """Rows of one fold buffer: ``min(cohort, max(1, budget // (4·numel)))``."""
    if cohort < 1:
        raise ValueError(f"cohort = {cohort}: a fold needs at least one planned client")
    if numel < 1:
        raise ValueError(f"numel = {numel}: a fold needs at least one parameter")
    return min(cohort, max(1, budget // (4 * numel)))


@dataclass(frozen=True)
class FoldedClient:
    """What a fold keeps of each update once its vector is summed: the
    count and metrics that ``train_loss`` and adaptive clipping read."""

    client_id: str
    num_examples: int
    metrics: Mapping[str, float]
    contributors: int = 1


class UpdateFold:
    """A weighted sum of client updates, folded in as they arrive, in at most
    one buffer of :func:`fold_capacity` rows.

    An executor that streams asks :meth:`row` for the row to write the next
    update into (no copy); :meth:`add_` takes that row, any other vector
    (copied into the row, so the caller may reuse it) or, with
    ``borrow=True``, a vector the caller keeps alive (an update an executor
    returned: held by reference, never copied). A full buffer is reduced into
    a running ``float32`` total (``w_unnormalised @ X_chunk``) and reused.

    When every update fits in one buffer (every cohort of a model under
    ``budget / (4·cohort)`` parameters) the result is exactly the
    expression of the unfolded reduction, over the rows in cohort order:
    :func:`weighted_mean` (one ``w @ X``) or ``stack(rows).sum(dim=0)``, bit
    for bit. With several buffers the order of the additions differs from one
    ``w @ X`` (chunk sums, then the division by the total weight), which
    changes the result by float rounding only; integer weights above 2**24
    are rounded to ``float32`` (a relative 6e-8) in the chunk products.
    """

    def __init__(
        self,
        reduction: Reduction,
        numel: int,
        cohort: Sequence[str],
        kind: UpdateKind,
        device: torch.device,
        budget: int = FOLD_BUDGET_BYTES,
    ) -> None:
        if not isinstance(reduction, Reduction):
            raise TypeError(f"reduction = {reduction!r}: expected a Reduction")
        self.reduction = reduction
        self.numel = numel
        self.kind = kind
        self.device = device
        self.capacity = fold_capacity(max(1, len(cohort)), numel, budget)
        self._clients: list[FoldedClient] = []
        self._position = {cid: i for i, cid in reversed(list(enumerate(cohort)))}
        self._buffer: torch.Tensor | None = None
        self._pending: list[ClientUpdate] = []
        self._total: torch.Tensor | None = None
        self._weight = 0.0
        self._reduced = 0

    @property
    def count(self) -> int:
        """How many updates are folded in."""
        return len(self._clients)

    @property
    def clients(self) -> list[FoldedClient]:
        """The folded clients in cohort order (whatever order they arrived
        in), so that figures computed over them do not depend on it."""
        end = len(self._position)
        return sorted(self._clients, key=lambda c: self._position.get(c.client_id, end))

    @property
    def buffers_reduced(self) -> int:
        """How many full buffers went into the running total (0: one buffer)."""
        return self._reduced

    def row(self) -> torch.Tensor:
        """The ``(numel,)`` row the next update may be written into; the same
        row again until an update is added."""
        if len(self._pending) >= self.capacity:
            self._reduce_pending_()
        if self._buffer is None:
            self._buffer = torch.empty((self.capacity, self.numel), dtype=torch.float32, device=self.device)
        return self._buffer[len(self._pending)]

    def add_(self, update: ClientUpdate, borrow: bool = False) -> None:
        """Fold ``update`` in (checked by the caller: a float32 vector of
        ``numel`` values, see :func:`fedtrain.validation.inspect_update`)."""
        if borrow:
            if len(self._pending) >= self.capacity:
                self._reduce_pending_()
            self._pending.append(update)
        else:
            out = self.row()
            if not _same_memory(out, update.vector):
                out.copy_(update.vector)
            self._pending.append(_with_vector(update, out))
        self._clients.append(FoldedClient(update.client_id, update.num_examples, update.metrics, update.contributors))

    def _counts(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        if self.reduction is Reduction.WEIGHTED_MEAN:
            return torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        return torch.ones(len(updates), dtype=torch.float64)

    def _reduce_pending_(self) -> None:
        pending = self._pending
        if not pending:
            return
        counts = self._counts(pending)
        chunk = _weighted_sum([u.vector for u in pending], counts.to(torch.float32).to(self.device))
        self._total = chunk if self._total is None else self._total.add_(chunk)
        self._weight += float(counts.sum())
        self._reduced += 1
        self._pending = []

    def _in_cohort_order(self) -> list[ClientUpdate]:
        end = len(self._position)
        order = sorted(range(len(self._pending)), key=lambda i: self._position.get(self._pending[i].client_id, end))
        pending = [self._pending[i] for i in order]
        buffer = self._buffer
        if order != sorted(order) and buffer is not None and all(
            _same_memory(u.vector, buffer[i]) for i, u in zip(order, pending)
        ):
            n = len(pending)
            buffer[:n] = buffer[torch.tensor(order, device=buffer.device)]
            pending = [_with_vector(u, buffer[i]) for i, u in enumerate(pending)]
        return pending

    def result(self) -> torch.Tensor:
        """The reduction of everything folded in; raises when nothing was."""
        if not self._clients:
            raise ValueError("no updates were folded in")
        if not self._reduced:
            pending = self._in_cohort_order()
            if self.reduction is Reduction.SUM:
                return stack(pending).sum(dim=0)
            return weighted_mean(pending, self.reduction is Reduction.WEIGHTED_MEAN)
        self._reduce_pending_()
        total = self._total
        if total is None:
            raise ValueError("no updates were folded in")
        return total if self.reduction is Reduction.SUM else total / self._weight

    def aggregate(self) -> AggregateUpdate:
        """The one update a strategy gets for the folded clients
        (``origin`` :attr:`~fedtrain.types.AggregateOrigin.CLIENT_MEAN`): their
        mean, their summed ``num_examples`` and their count, as secure
        aggregation hands over its sum."""
        if self.reduction is Reduction.SUM:
            raise ValueError("a sum fold is released by its privacy policy, not handed to a strategy")
        return AggregateUpdate(
            vector=self.result(),
            num_examples=sum(c.num_examples for c in self.clients),
            kind=self.kind,
            contributors=sum(c.contributors for c in self.clients),
            origin=AggregateOrigin.CLIENT_MEAN,
        )


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _with_vector(update: ClientUpdate, vector: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(update.client_id, vector, update.num_examples, update.kind, update.metrics, update.contributors)
