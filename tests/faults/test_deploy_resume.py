"""A deployed coordinator SIGKILLed mid-run and restarted with ``--resume``:
its clients reconnect and the run completes with every round exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedtrain.deploy import free_port

ROUNDS = 4


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
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_killed_coordinator_resumes_and_loses_nothing(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
    sets = ["--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=2", "--set", "strategy.clients_per_round=2"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        first = start(_cli("server", "--insecure", "--address", address, "--out", str(run_dir), "--quiet", *sets),
                      "server-1.log")
        for i in range(2):
            start(_cli("client", "--insecure", "--server", address, "--partition", str(i),
                       "--connect-timeout", "120"), f"client-{i}.log")
        deadline = time.monotonic() + 300
        while len(_rows(run_dir)) < 2:
            assert first.poll() is None, (tmp_path / "server-1.log").read_text()
            assert time.monotonic() < deadline, "no second round within 300 s"
            time.sleep(0.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        done_before = len(_rows(run_dir))

        second = start(_cli("server", "--insecure", "--address", address, "--resume", str(run_dir), "--quiet"),
                       "server-2.log")
        rc = second.wait(400)
    finally:
        _stop(procs)

    rows = _rows(run_dir)
    assert rc == 0, (tmp_path / "server-2.log").read_text()
    assert done_before >= 2
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert rows[-1]["num_clients"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
