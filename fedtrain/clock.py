"""Simulated time: each client's speed, how long its local work takes, and
the virtual clock a simulation's rounds (sync) or completions (async) advance.

A simulation does not sleep: a client's job lasts ``local steps ×
clients.step_seconds × its slowdown`` virtual seconds, with ``local steps =
epochs × ⌈records / batch_size⌉`` (the optimiser steps of one job). The
slowdowns are drawn once per run from a numpy generator seeded by
``run.seed``: experiment randomness, reproducible, nothing secret, so that an
async and a sync run of the same workload see the same population and can be
compared by virtual time to a target accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fedtrain.config import ClientSpeed, PopulationConfig

SPEED_STREAM = 0xC10C
"""Mixed into ``run.seed`` for the slowdowns' generator, so that they draw
from a stream of their own (the partition uses ``0x9A27``)."""


def slowdowns(population: PopulationConfig, clients: Sequence[str], seed: int) -> dict[str, float]:
    """Each client's slowdown (1.0 = a speed-1 client), in ``clients``' order.

    ``lognormal``: ``exp(N(0, spread²))``, median 1. ``stragglers``:
    ``round(fraction × N)`` clients, drawn without replacement, are
    ``stragglers_slowdown`` times slower, the rest 1."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPEED_STREAM]))
    n = len(clients)
    if population.speed is ClientSpeed.LOGNORMAL:
        factors = np.exp(rng.normal(0.0, population.spread, size=n))
    elif population.speed is ClientSpeed.STRAGGLERS:
        factors = np.ones(n)
        slow = rng.choice(n, size=int(round(population.stragglers_fraction * n)), replace=False)
        factors[slow] = population.stragglers_slowdown
    else:
        factors = np.ones(n)
    return {cid: float(f) for cid, f in zip(clients, factors)}


def local_steps(records: int, epochs: int, batch_size: int) -> int:
    """Optimiser steps of one job: ``epochs × ⌈records / batch_size⌉``."""
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"epochs = {epochs}, batch_size = {batch_size}: both must be >= 1")
    return epochs * math.ceil(max(records, 0) / batch_size)


@dataclass(frozen=True)
class ClientDurations:
    """How many virtual seconds one job of each client lasts."""

    seconds: Mapping[str, float]

    @classmethod
    def of(
        cls, population: PopulationConfig, sizes: Mapping[str, int], epochs: int, batch_size: int, seed: int
    ) -> ClientDurations:
        """The durations of the clients of ``sizes`` (id → record count)."""
        factors = slowdowns(population, list(sizes), seed)
        return cls({
            cid: local_steps(n, epochs, batch_size) * population.step_seconds * factors[cid]
            for cid, n in sizes.items()
        })

    def of_client(self, client_id: str) -> float:
        """One job of ``client_id``; an unknown client takes no time (its job fails at once)."""
        return self.seconds.get(client_id, 0.0)

    def slowest(self, clients: Sequence[str]) -> float:
        """A synchronous round's length: it waits for its slowest client (0.0 for none)."""
        return max((self.of_client(c) for c in clients), default=0.0)


class VirtualClock:
    """Virtual seconds since the run started; only moves forward."""

    def __init__(self, durations: ClientDurations, now: float = 0.0) -> None:
        self.durations = durations
        self.now = float(now)

    def advance_to_(self, t: float) -> float:
        """Move to ``t`` (never back); returns the new time."""
        if t < self.now:
            raise ValueError(f"virtual time {t} is before now = {self.now}: the clock only moves forward")
        self.now = float(t)
        return self.now

    def advance_by_(self, seconds: float) -> float:
        """Move ``seconds`` forward; returns the new time."""
        return self.advance_to_(self.now + seconds)

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.now = float(state["now"])
