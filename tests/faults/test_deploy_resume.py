"""A deployed coordinator SIGKILLed mid-run and restarted with ``--resume``:
its clients reconnect and the run completes with every round exactly once.
The run starts in the background as the session begins
(:func:`deployed.in_background`)."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtrain.deploy.addresses import free_port

from deployed import Started, background_result, cli, in_background, rows

ROUNDS = 4


@dataclass(frozen=True)
class Deployment:
    first_log: str
    second_rc: int
    second_log: str
    done_before: int
    run_dir: Path


@in_background("test_deploy_resume", 65)
def deploy(root: Path) -> Deployment:
    """The run, killed and resumed, started in the background as the session begins."""
    address = f"127.0.0.1:{free_port()}"
    run_dir = root / "run"
    sets = ["--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=2", "--set", "strategy.clients_per_round=2"]

    with Started(root) as started:
        first = started.start("server-1", cli("server", "--insecure", "--address", address, "--out", str(run_dir),
                                              "--quiet", *sets))
        for i in range(2):
            started.start(f"client-{i}", cli("client", "--insecure", "--server", address, "--partition", str(i),
                                             "--connect-timeout", "120"))
        deadline = time.monotonic() + 300
        while len(rows(run_dir)) < 2:
            if first.poll() is not None:
                raise RuntimeError(f"the first coordinator exited: {started.log('server-1')}")
            if time.monotonic() > deadline:
                raise TimeoutError("no second round within 300 s")
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        done_before = len(rows(run_dir))

        second = started.start("server-2", cli("server", "--insecure", "--address", address, "--resume", str(run_dir),
                                               "--quiet"))
        rc = second.wait(400)
    return Deployment(started.log("server-1"), rc, started.log("server-2"), done_before, run_dir)


def test_killed_coordinator_resumes_and_loses_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    deployment = background_result("test_deploy_resume", tmp_path_factory.mktemp)
    run_dir = deployment.run_dir

    metrics = rows(run_dir)
    assert deployment.second_rc == 0, deployment.second_log
    assert deployment.done_before >= 2
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))
    assert metrics[-1]["num_clients"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
