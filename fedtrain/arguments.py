"""Checks for a strategy's constructor options and for the kind of its updates.

Strategies are plug-ins written against the public ``fedtrain`` API, and their
options come straight from a config file's ``[strategy.options]`` table. Every
bad option must therefore fail at construction with a ``ValueError`` that names
the option, the value and what is allowed (``"tau = 0.0: must be a finite number
> 0"``), never later inside a round. These functions give every strategy,
built-in or not, the same checks and the same messages; each returns the value
in its canonical type.

``bool`` is rejected wherever a number is expected: ``True`` is an ``int`` in
Python, but ``server_lr = true`` in a config file is a mistake, not ``1``.
"""

from __future__ import annotations

import math
from typing import Sequence

from fedtrain.types import ClientUpdate, UpdateKind

__all__ = ["flag", "fraction", "integer", "non_negative", "positive", "require_kind"]


def positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number ``> 0``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} = {value!r}: must be a finite number > 0")
    return float(value)


def non_negative(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number ``>= 0``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} = {value!r}: must be a finite number >= 0")
    return float(value)


def fraction(name: str, value: object, upper: float = 1.0) -> float:
    """``value`` as a float if it is a number in ``[0, upper)``, else ValueError
    (e.g. ``"beta1 = 1.0: must be in [0, 1)"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < upper:
        raise ValueError(f"{name} = {value!r}: must be in [0, {upper:g})")
    return float(value)


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else ValueError (no truthy strings or 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} = {value!r}: must be true or false")
    return value


def integer(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} = {value!r}: must be an integer >= {minimum}")
    return value


_WHAT = {UpdateKind.DELTA: "model deltas", UpdateKind.GRADIENT: "gradients"}


def require_kind(strategy: str, updates: Sequence[ClientUpdate], kind: UpdateKind) -> None:
    """Raise ValueError naming every client whose update is not of ``kind``
    (e.g. ``"FedAvg aggregates model deltas; clients ['c0'] sent another kind"``).
    """
    bad = [u.client_id for u in updates if u.kind != kind]
    if bad:
        raise ValueError(f"{strategy} aggregates {_WHAT[kind]}; clients {bad} sent another kind")
