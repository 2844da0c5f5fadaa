"""The virtual clock and the population's speed models (fedtrain/clock.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtrain.clock import ClientDurations, VirtualClock, local_steps, slowdowns
from fedtrain.config import ClientSpeed, PopulationConfig

IDS = [str(i) for i in range(1000)]


def test_constant_speeds_are_all_one() -> None:
    assert set(slowdowns(PopulationConfig(), IDS, 0).values()) == {1.0}


def test_stragglers_are_the_configured_share_at_the_configured_slowdown() -> None:
    population = PopulationConfig(speed=ClientSpeed.STRAGGLERS, stragglers_fraction=0.2, stragglers_slowdown=10.0)

    factors = slowdowns(population, IDS, 3)

    assert sorted(set(factors.values())) == [1.0, 10.0]
    assert sum(f == 10.0 for f in factors.values()) == 200


def test_lognormal_slowdowns_have_the_configured_spread() -> None:
    population = PopulationConfig(speed=ClientSpeed.LOGNORMAL, spread=0.7)

    logs = np.log(list(slowdowns(population, [str(i) for i in range(20000)], 1).values()))

    assert abs(logs.mean()) < 0.03
    assert abs(logs.std() - 0.7) < 0.02


def test_speeds_follow_the_seed_and_only_the_seed() -> None:
    population = PopulationConfig(speed=ClientSpeed.STRAGGLERS)

    assert slowdowns(population, IDS, 5) == slowdowns(population, IDS, 5)
    assert slowdowns(population, IDS, 5) != slowdowns(population, IDS, 6)


def test_a_job_lasts_its_local_steps_times_the_step_and_the_slowdown() -> None:
    population = PopulationConfig(speed=ClientSpeed.STRAGGLERS, stragglers_fraction=0.5, step_seconds=2.0)
    sizes = {"a": 70, "b": 70}

    durations = ClientDurations.of(population, sizes, epochs=3, batch_size=32, seed=0)

    assert local_steps(70, 3, 32) == 3 * math.ceil(70 / 32) == 9
    assert sorted(durations.seconds.values()) == [9 * 2.0, 9 * 2.0 * 10.0]
    assert durations.slowest(["a", "b"]) == 180.0
    assert durations.slowest([]) == 0.0


def test_the_clock_only_moves_forward_and_round_trips_its_state() -> None:
    clock = VirtualClock(ClientDurations({}))
    clock.advance_by_(2.5)
    clock.advance_to_(4.0)

    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance_to_(3.0)
    other = VirtualClock(ClientDurations({}))
    other.load_state_dict(clock.state_dict())
    assert other.now == 4.0
