"""The configs of ``simulations/`` compute what they computed when their
digests were recorded (``tests/golden/simulation_metrics.py`` runs them all;
this test runs the quick ones): a structural change must not move a bit.
Digests are recorded per machine kind (the bits depend on the CPU's kernels);
a run must compute exactly what one recorded kind computed."""

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


CONFIGS = sorted({name for digests in RECORDED.values() for name in digests})


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - SLOW))
def test_simulation_metrics_are_bit_identical_to_the_recorded_ones(name: str, tmp_path: Path) -> None:
    script = _script()

    got = script.run(script.ROOT / "simulations" / f"{name}.toml", tmp_path / "run")

    assert script.kind_computing(RECORDED, name, got) is not None, (
        f"simulations/{name}.toml: metrics.jsonl differs from every recorded machine kind's "
        f"({'; '.join(RECORDED)}); this machine is {script.machine_kind()} "
        "(a new kind: python tests/golden/simulation_metrics.py --add)")


def test_a_digest_matches_only_the_kind_that_computed_it() -> None:
    script = _script()
    recorded = {"A": {"x": "1", "y": "2"}, "B": {"x": "3"}}

    assert script.kind_computing(recorded, "x", "1") == "A"
    assert script.kind_computing(recorded, "x", "3") == "B"
    assert script.kind_computing(recorded, "y", "3") is None  # B's digest of x is not a digest of y
    assert script.kind_computing(recorded, "z", "1") is None


def test_every_simulation_has_a_recorded_digest() -> None:
    script = _script()
    configs = {p.stem for p in (script.ROOT / "simulations").glob("*.toml")} - set(script.EXCLUDED)

    assert {kind: set(digests) for kind, digests in RECORDED.items()} == {kind: configs for kind in RECORDED}
