"""Checks on a client update before it may reach aggregation.

A bad update is dropped with a reason; it never crashes the round. Every
field a client supplies is checked: the vector (type, dtype, shape, finite),
the record count that weights it and the metrics that may reach
``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtrain.types import MAX_RECORDS, ClientFailure, ClientMetric, ClientUpdate, UpdateKind

_METRICS = {m.value for m in ClientMetric}


def count_reason(name: str, value: Any, minimum: int, maximum: int) -> str | None:
    """Why ``value`` is not an integer in ``minimum … maximum`` (bools are
    not integers here), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} = {describe(value)}: expected an integer in {minimum} … {maximum}"
    if not minimum <= value <= maximum:
        return f"{name} = {describe(value)}: must be in {minimum} … {maximum}"
    return None


def metrics_reason(metrics: Any) -> str | None:
    """Why ``metrics`` cannot be recorded, or None: a mapping of at most the
    :class:`~fedtrain.types.ClientMetric` names to finite floats
    (``unclipped`` 0.0 or 1.0).

    A bad metric refuses the whole update rather than dropping the metric:
    a client that sends malformed metrics is broken or hostile, so its update
    is no more trustworthy, and ``unclipped`` is part of what adaptive clipping
    accounts, which a silently dropped value would change.
    """
    if not isinstance(metrics, Mapping):
        return f"metrics = {describe(metrics)}: expected a mapping of {sorted(_METRICS)} to numbers"
    for key, value in metrics.items():
        if not isinstance(key, str) or key not in _METRICS:
            return f"metric {describe(key)}: unknown; allowed are {sorted(_METRICS)}"
        if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
            return f"metric {key} = {describe(value)}: expected a finite float"
        if key == ClientMetric.UNCLIPPED and value not in (0.0, 1.0):
            return f"metric {key} = {value!r}: expected 0.0 or 1.0"
    return None


@dataclass(frozen=True)
class Inspection:
    """The verdict on one update: why it is refused (None when it may be
    aggregated) and, for an accepted one, its L2 norm, so that a privacy
    policy's norm bound does not read the vector a second time."""

    reason: str | None
    norm: float = math.nan


def finite_norm(v: torch.Tensor) -> float:
    """The L2 norm of a float32 vector in one read, ``inf`` or NaN when a
    value is not finite (NaN and ±inf propagate through the norm). Only when
    the float32 norm overflows although every value is finite (values above
    ~1.8e19) is it computed again in float64, where squares of float32
    values cannot overflow."""
    norm = float(torch.linalg.vector_norm(v))
    if norm == math.inf:
        norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    return norm


def inspect_update(update: ClientUpdate, numel: int, kind: UpdateKind) -> Inspection:
    """Whether ``update`` can be aggregated, and its norm when it can.

    ``num_examples`` must be an integer in 1 … :data:`~fedtrain.types.MAX_RECORDS`
    per client the update stands for (``contributors``, more than one for a
    secure aggregate). Finiteness and the norm come from one pass over the
    vector (:func:`finite_norm`), not a full-size mask per update.
    """
    v = update.vector
    if not isinstance(v, torch.Tensor):
        return Inspection(f"vector is a {type(v).__name__}, not a tensor")
    if v.dtype != torch.float32:
        return Inspection(f"dtype {v.dtype}, expected torch.float32")
    if v.shape != (numel,):
        return Inspection(f"shape {tuple(v.shape)}, expected ({numel},)")
    if update.kind is not kind:
        return Inspection(
            f"kind {describe(getattr(update.kind, 'value', update.kind))}, the round asked for {kind.value!r}"
        )
    reason = count_reason("contributors", update.contributors, 1, MAX_RECORDS)
    if reason is None:
        reason = count_reason("num_examples", update.num_examples, 1, MAX_RECORDS * update.contributors)
    if reason is None:
        reason = metrics_reason(update.metrics)
    if reason is not None:
        return Inspection(reason)
    norm = finite_norm(v)
    if not math.isfinite(norm):
        return Inspection("vector has NaN or infinite values")
    return Inspection(None, norm)


def rejection_reason(update: ClientUpdate, numel: int, kind: UpdateKind) -> str | None:
    """Why ``update`` cannot be aggregated, or None when it can
    (:func:`inspect_update`'s reason)."""
    return inspect_update(update, numel, kind).reason


def split_valid(
    updates: Sequence[ClientUpdate], numel: int, kind: UpdateKind, prefix: str = ""
) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """The updates :func:`rejection_reason` accepts, and a failure (its
    reason after ``prefix``) for each other, both in the order given."""
    valid: list[ClientUpdate] = []
    failures: list[ClientFailure] = []
    for update in updates:
        reason = rejection_reason(update, numel, kind)
        if reason is None:
            valid.append(update)
        else:
            failures.append(ClientFailure(update.client_id, prefix + reason))
    return valid, failures


def describe(value: Any, limit: int = 80) -> str:
    """``value`` for an error message: ``repr`` of a plain value cut to
    ``limit`` characters, the type of anything else. A client's value goes
    into logs and ``metrics.jsonl``: it must not flood them, cost time to
    print, or carry control characters (``repr`` escapes them)."""
    if type(value) is int and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    if type(value) not in (str, int, float, bool, type(None)):
        return f"a {type(value).__name__}"
    text = repr(value[: limit + 2] if type(value) is str else value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
