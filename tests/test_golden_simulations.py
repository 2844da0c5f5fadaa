"""The configs of ``simulations/`` compute what they computed when their
digests were recorded (``tests/golden/simulation_metrics.py`` runs them all;
this test runs the quick ones): a structural change must not move a bit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
SLOW = {"distributed_dp", "dp_sample_cross_silo"}


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("simulation_metrics", GOLDEN / "simulation_metrics.py")
    if spec is None or spec.loader is None:
        raise ImportError("tests/golden/simulation_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECORDED = json.loads((GOLDEN / "simulation_metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(set(RECORDED) - SLOW))
def test_simulation_metrics_are_bit_identical_to_the_recorded_ones(name: str, tmp_path: Path) -> None:
    script = _script()

    got = script.run(script.ROOT / "simulations" / f"{name}.toml", tmp_path / "run")

    assert got == RECORDED[name], f"simulations/{name}.toml: metrics.jsonl changed"


def test_every_simulation_has_a_recorded_digest() -> None:
    script = _script()
    configs = {p.stem for p in (script.ROOT / "simulations").glob("*.toml")} - set(script.EXCLUDED)

    assert configs == set(RECORDED)
