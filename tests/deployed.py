"""Helpers for tests that run real ``fedtrain server`` / ``fedtrain client``
processes: start them, read their run folder, and make sure none survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def cli(*args: str) -> list[str]:
    """The command line of ``fedtrain ARGS`` with this interpreter."""
    return [sys.executable, "-m", "fedtrain.cli", *args]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows written so far (none before the first round)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Started:
    """Processes a test started, each in its own session and logging to
    ``logs/NAME.log``; all of them are killed on exit, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
