"""Secure aggregation in a real deployment: ``fedtrain server`` and three
``fedtrain client`` processes (plain text, to stay fast) run SecAgg+ over
Flower messages; the run completes with every client in every round's sum,
and the model learns. The run starts in the background as the session
begins (:func:`deployed.in_background`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtrain.deploy.addresses import free_port

from deployed import Started, background_result, cli, in_background, rows

ROUNDS = 3
CLIENTS = 3


@dataclass(frozen=True)
class Deployment:
    rc: int
    logs: str
    run_dir: Path


@in_background("test_deploy_secure", 85)
def deploy(root: Path) -> Deployment:
    """The run, started in the background as the session begins."""
    address = f"127.0.0.1:{free_port()}"
    run_dir = root / "run"
    sets = [
        "--set", f"run.rounds={ROUNDS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "client.timeout=60",
        "--set", "secure.aggregation=true",
    ]

    with Started(root) as started:
        server = started.start("server", cli("server", "--insecure", "--address", address, "--out", str(run_dir),
                                             "--quiet", "--wait", "120", *sets))
        for i in range(CLIENTS):
            started.start(f"client-{i}", cli("client", "--insecure", "--server", address, "--partition", str(i),
                                             "--connect-timeout", "120"))
        rc = server.wait(480)
    return Deployment(rc, started.all_logs(), run_dir)


def test_secure_aggregation_runs_over_the_deployment(tmp_path_factory: pytest.TempPathFactory) -> None:
    deployment = background_result("test_deploy_secure", tmp_path_factory.mktemp)
    logs, run_dir = deployment.logs, deployment.run_dir

    metrics = rows(run_dir)
    assert deployment.rc == 0, logs
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1)), logs
    assert all(r["num_clients"] == CLIENTS and r["num_failed"] == 0 for r in metrics), metrics
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"], metrics
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
