"""Checks on a client update before it may reach aggregation.

A bad update is dropped with a reason; it never crashes the round.
"""

from __future__ import annotations

import math

import torch

from fedtrain.types import ClientUpdate, UpdateKind


def rejection_reason(update: ClientUpdate, numel: int, kind: UpdateKind) -> str | None:
    """Why ``update`` cannot be aggregated, or None when it can.

    Finiteness is checked through one float64 sum (NaN and ±inf propagate;
    float32 values cannot overflow it) rather than a full-size mask per update.
    """
    v = update.vector
    if not isinstance(v, torch.Tensor):
        return f"vector is a {type(v).__name__}, not a tensor"
    if v.dtype != torch.float32:
        return f"dtype {v.dtype}, expected torch.float32"
    if v.shape != (numel,):
        return f"shape {tuple(v.shape)}, expected ({numel},)"
    if update.kind is not kind:
        return f"kind {update.kind.value!r}, the round asked for {kind.value!r}"
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples = {update.num_examples!r}, expected a positive integer"
    if not math.isfinite(float(v.sum(dtype=torch.float64))):
        return "vector has NaN or infinite values"
    return None
