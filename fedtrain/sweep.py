"""``fedtrain simulate CONFIG --sweep KEY=V1,V2 ...``: the grid of runs a sweep makes.

A sweep is the product of its axes' values, in the order given (the last
axis varies fastest, as in ``itertools.product``); each point is a list of
``--set`` overrides and has its own run folder under the sweep's parent.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Sequence

from fedtrain.errors import UsageError

UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
"""Characters a point's folder name does not keep (``/`` and ``:`` of a plug-in path, spaces)."""


def split_values(text: str) -> list[str]:
    """``fedavg,fedadam`` → ``['fedavg', 'fedadam']``; a comma inside brackets
    or quotes (a TOML list or string: ``[1, 2]``, ``"a,b"``) does not split."""
    values: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


@dataclass(frozen=True)
class SweepAxis:
    """One ``--sweep KEY=V1,V2``: a config key and the values it takes."""

    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, item: str) -> SweepAxis:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = tuple(split_values(raw)) if sep else ()
        if not sep or not key or any(not part for part in key.split(".")) or not all(values):
            raise UsageError(f"--sweep {item!r}: expected SECTION.KEY=VALUE1,VALUE2,... (no empty value)")
        if len(set(values)) != len(values):
            raise UsageError(f"--sweep {item!r}: a value is given twice")
        return cls(key, values)


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its overrides (``KEY=VALUE``), in axis order."""

    overrides: tuple[str, ...]

    def label(self) -> str:
        """``strategy.name=fedadam, run.seed=1``."""
        return ", ".join(self.overrides)

    def folder(self, index: int, width: int) -> str:
        """The run folder's name: its position, then its overrides, e.g. ``2-strategy.name=fedadam,run.seed=1``."""
        return f"{index:0{width}d}-" + UNSAFE.sub("_", ",".join(self.overrides))


@dataclass(frozen=True)
class Sweep:
    """The axes of a sweep and the product of their values."""

    axes: tuple[SweepAxis, ...]

    @classmethod
    def parse(cls, items: Sequence[str]) -> Sweep:
        """The sweep of the ``--sweep`` flags; a key swept twice is refused."""
        axes = tuple(SweepAxis.parse(item) for item in items)
        keys = [axis.key for axis in axes]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UsageError(f"--sweep {twice[0]}=...: the key is swept twice; give all its values in one --sweep")
        return cls(axes)

    def points(self) -> list[SweepPoint]:
        """Every combination of the axes' values, the last axis varying fastest."""
        combos = itertools.product(*[[f"{axis.key}={v}" for v in axis.values] for axis in self.axes])
        return [SweepPoint(tuple(combo)) for combo in combos]
