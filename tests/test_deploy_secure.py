"""Secure aggregation in a real deployment: ``fedtrain server`` and three
``fedtrain client`` processes (plain text, to stay fast) run SecAgg+ over
Flower messages; the run completes with every client in every round's sum,
and the model learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtrain.deploy import free_port

ROUNDS = 3
CLIENTS = 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrain.cli", *args]


def _rows(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_secure_aggregation_runs_over_the_deployment(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
    sets = [
        "--set", f"run.rounds={ROUNDS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "client.timeout=60",
        "--set", "secure.aggregation=true",
    ]
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        server = start(_cli("server", "--insecure", "--address", address, "--out", str(run_dir), "--quiet",
                            "--wait", "120", *sets), "server.log")
        for i in range(CLIENTS):
            start(_cli("client", "--insecure", "--server", address, "--partition", str(i),
                       "--connect-timeout", "120"), f"client-{i}.log")
        rc = server.wait(480)
    finally:
        _stop(procs)

    rows = _rows(run_dir)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert rc == 0, logs
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), logs
    assert all(r["num_clients"] == CLIENTS and r["num_failed"] == 0 for r in rows), rows
    assert rows[-1]["accuracy"] > rows[0]["accuracy"], rows
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
