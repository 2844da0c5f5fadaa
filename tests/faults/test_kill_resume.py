"""A coordinator killed with SIGKILL mid-run resumes with nothing lost or
counted twice. Its three runs are processes of their own, so they run in the
background as the session begins (:func:`deployed.in_background`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtrain.results import read_metrics

from deployed import background_result, in_background

ARGS = ["--set", "run.rounds=30", "--set", "strategy.clients_per_round=4",
        "--set", "privacy.mode=user", "--set", "privacy.noise_multiplier=0.5",
        "--set", "strategy.sampling=poisson", "--set", "privacy.secure_noise=false"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrain.cli", "simulate", "--quiet", *args]


@dataclass(frozen=True)
class Runs:
    full: Path
    killed: Path
    survived: int
    resumed: subprocess.CompletedProcess[str]


@in_background("test_kill_resume", 30)
def kill_and_resume(root: Path) -> Runs:
    """An uninterrupted run, and the same run killed after 8 rounds or more and resumed."""
    full, killed = root / "full", root / "killed"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    subprocess.run(_cli("--out", str(full), *ARGS), check=True, timeout=300, env=env)

    proc = subprocess.Popen(_cli("--out", str(killed), *ARGS), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    survived = len(read_metrics(killed))
    resumed = subprocess.run(
        [sys.executable, "-m", "fedtrain.cli", "simulate", "--quiet", "--resume", str(killed)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    return Runs(full, killed, survived, resumed)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = background_result("test_kill_resume", tmp_path_factory.mktemp)

    assert 8 <= runs.survived < 30, "the run should have been killed mid-way"
    assert runs.resumed.returncode == 0, runs.resumed.stderr
    strip = lambda run: [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]  # noqa: E731
    assert strip(runs.killed) == strip(runs.full)
    assert [r["round"] for r in read_metrics(runs.killed)] == list(range(1, 31))
    a: dict[str, Any] = torch.load(runs.full / "model.pt", weights_only=True)
    b: dict[str, Any] = torch.load(runs.killed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
