"""A deployed coordinator SIGKILLed mid-run and restarted with ``--resume``:
its clients reconnect and the run completes with every round exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from fedtrain.deploy.addresses import free_port

from deployed import Started, cli, rows

ROUNDS = 4


def test_killed_coordinator_resumes_and_loses_nothing(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    sets = ["--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=2", "--set", "strategy.clients_per_round=2"]

    with Started(tmp_path) as started:
        first = started.start("server-1", cli("server", "--insecure", "--address", address, "--out", str(run_dir),
                                              "--quiet", *sets))
        for i in range(2):
            started.start(f"client-{i}", cli("client", "--insecure", "--server", address, "--partition", str(i),
                                             "--connect-timeout", "120"))
        deadline = time.monotonic() + 300
        while len(rows(run_dir)) < 2:
            assert first.poll() is None, started.log("server-1")
            assert time.monotonic() < deadline, "no second round within 300 s"
            time.sleep(0.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        done_before = len(rows(run_dir))

        second = started.start("server-2", cli("server", "--insecure", "--address", address, "--resume", str(run_dir),
                                               "--quiet"))
        rc = second.wait(400)

    metrics = rows(run_dir)
    assert rc == 0, started.log("server-2")
    assert done_before >= 2
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))
    assert metrics[-1]["num_clients"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
