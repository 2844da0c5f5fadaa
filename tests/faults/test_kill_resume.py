"""A coordinator killed with SIGKILL mid-run resumes with nothing lost or counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedtrain.results import read_metrics

ARGS = ["--set", "run.rounds=30", "--set", "strategy.clients_per_round=4",
        "--set", "privacy.mode=user", "--set", "privacy.noise_multiplier=0.5",
        "--set", "strategy.sampling=poisson", "--set", "privacy.secure_noise=false"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrain.cli", "simulate", "--quiet", *args]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
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
    assert 8 <= survived < 30, "the run should have been killed mid-way"

    resumed = subprocess.run(
        [sys.executable, "-m", "fedtrain.cli", "simulate", "--quiet", "--resume", str(killed)],
        capture_output=True, text=True, timeout=300, env=env,
    )

    assert resumed.returncode == 0, resumed.stderr
    strip = lambda run: [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]  # noqa: E731
    assert strip(killed) == strip(full)
    assert [r["round"] for r in read_metrics(killed)] == list(range(1, 31))
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
