"""Coordinator memory does not grow with the cohort: each update is folded in
as it arrives (issue 15; ``benchmarks/coordinator_memory.py`` measures the
34M-parameter case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtrain.aggregation import FOLD_BUDGET_BYTES, fold_capacity

from deployed import background_result, in_background

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 106_667
"""``model.hidden`` of an 8.0M-parameter digits MLP (75·hidden + 10)."""

CHILD = """
import json, logging, resource, sys, tempfile
from pathlib import Path
from fedtrain.config import load
from fedtrain.simulation import simulate
logging.basicConfig(level=logging.ERROR)
hidden, per_round = int(sys.argv[1]), int(sys.argv[2])
sets = ["data.dataset=digits", "data.num_clients=16", "data.partition=iid", "model.name=mlp",
        f"model.hidden={hidden}", "strategy.name=fedavg", f"strategy.clients_per_round={per_round}",
        "run.rounds=2", "client.engine=sequential", "client.epochs=1", "client.batch_size=1000", "client.lr=0.1"]
with tempfile.TemporaryDirectory() as tmp:
    result = simulate(load(None, sets), out_dir=Path(tmp) / "run", plot=lambda *a, **k: None)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "parameters": result.summary.num_parameters, "rounds": result.summary.rounds}))
"""


def _peaks(*per_round: int) -> list[dict[str, int]]:
    """Each child's peak memory, the children run at once (each measures
    its own ``ru_maxrss``, so they do not disturb each other's figure)."""
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(HIDDEN), str(n)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in per_round]
    found = []
    try:
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err[-2000:]
            found.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            child.kill()
            child.wait()
    return found


PEAKS = "test_coordinator_memory::test_peak_memory_at_16_clients_per_round_is_within_a_quarter_of_4"


@in_background(PEAKS, 20)
def peaks_of_4_and_16(root: Path) -> list[dict[str, int]]:
    """The two children's figures; they are processes of their own, so they
    run in the background as the session begins (:func:`deployed.in_background`)."""
    return _peaks(4, 16)


def test_peak_memory_at_16_clients_per_round_is_within_a_quarter_of_4(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    small, large = background_result(PEAKS, tmp_path_factory.mktemp)
    assert small["parameters"] == large["parameters"] == 75 * HIDDEN + 10
    assert small["rounds"] == large["rounds"] == 2
    model_kib = small["parameters"] * 4 / 1024
    held_at_once = fold_capacity(16, small["parameters"]) * model_kib
    assert held_at_once <= FOLD_BUDGET_BYTES / 1024
    # Holding the cohort would add 12 models (≈ 375 MiB) between the two.
    assert large["peak_kib"] <= 1.25 * small["peak_kib"], (small, large)
    assert large["peak_kib"] - small["peak_kib"] < 4 * model_kib, (small, large)


def test_the_sequential_executor_with_a_sink_holds_no_cohort_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real simulation on the sequential engine: every update goes into the
    engine's fold, and the executor never allocates its ``(cohort, P)`` rows."""
    from fedtrain.config import load
    from fedtrain.simulation import simulate
    from fedtrain.training import sequential

    seen: list[sequential.SequentialExecutor] = []
    original = sequential.SequentialExecutor.__init__

    def recording(self: sequential.SequentialExecutor, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(sequential.SequentialExecutor, "__init__", recording)
    result = simulate(load(None, ["run.rounds=2", "client.engine=sequential", "strategy.clients_per_round=10"]),
                      out_dir=tmp_path / "run", plot=lambda *a, **k: None)
    assert result.records[-1].num_clients == 10
    assert seen and all(e._buffer.numel() == 0 for e in seen)
