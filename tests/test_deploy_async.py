"""Asynchronous training in a real deployment: ``fedtrain server`` and three
TLS ``fedtrain client`` processes with registered keys, ``run.mode =
"async"`` (FedBuff over Flower messages), one client answering every job
``DELAY`` seconds late (``--delay``). The coordinator aggregates the two fast
clients' updates without waiting for the slow one, takes the slow one's
stale updates when they come, and weights each by ``1/√(1+s)``. The run
starts in the background as the session begins (:func:`deployed.in_background`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtrain.certs import create_certificates
from fedtrain.deploy.addresses import free_port

from deployed import Started, background_result, cli, in_background, rows

AGGREGATIONS = 20
CLIENTS = 3
DELAY = 3.0
SLOW = "2"
"""The id of the slow client (the partition it trains on)."""


@dataclass(frozen=True)
class Deployment:
    rc: int
    logs: str
    run_dir: Path


@in_background("test_deploy_async", 60)
def deploy(root: Path) -> Deployment:
    certs = create_certificates(root / "certs", ["127.0.0.1", "localhost"], CLIENTS)
    address = f"127.0.0.1:{free_port()}"
    run_dir = root / "run"
    sets = [
        "--set", f"run.rounds={AGGREGATIONS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", "run.mode=async", "--set", f"async.concurrency={CLIENTS}", "--set", "async.buffer_size=2",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "strategy.min_clients=1",
        "--set", "client.timeout=60",
    ]
    with Started(root) as started:
        server = started.start("server", cli(
            "server", "--certs", str(certs.root), "--address", address, "--out", str(run_dir),
            "--quiet", "--wait", "120", *sets,
        ))
        for i in range(CLIENTS):
            slow = ["--delay", str(DELAY)] if str(i) == SLOW else []
            started.start(f"client-{i}", cli(
                "client", "--server", address, "--certs", str(certs.root), "--key", str(certs.root / f"client-{i + 1}"),
                "--partition", str(i), "--connect-timeout", "120", *slow,
            ))
        rc = server.wait(400)
    return Deployment(rc, started.all_logs(), run_dir)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return background_result("test_deploy_async", tmp_path_factory.mktemp)


def test_the_asynchronous_deployment_completes_every_aggregation(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    assert deployment.rc == 0, deployment.logs
    assert [r["round"] for r in metrics] == list(range(1, AGGREGATIONS + 1)), deployment.logs
    assert all(r["num_failed"] == 0 and 1 <= r["num_clients"] <= 2 for r in metrics), metrics
    assert all("virtual_time" not in r for r in metrics), "a deployment runs on the real clock"
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"], metrics
    assert json.loads((deployment.run_dir / "summary.json").read_text())["rounds"] == AGGREGATIONS


def test_aggregations_do_not_wait_for_the_slow_client(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    with_slow = [r["round"] for r in metrics if SLOW in r["staleness"]]
    assert with_slow, f"the slow client's updates never arrived: {metrics}"
    assert with_slow[0] >= 2, f"the first aggregation waited for the slow client: {with_slow}"
    fast = [sum(1 for r in metrics if c in r["staleness"]) for c in ("0", "1")]
    assert all(n > len(with_slow) for n in fast), (fast, with_slow)


def test_stale_updates_are_weighted_one_over_root_of_one_plus_staleness(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    for r in metrics:
        assert set(r["staleness"]) == set(r["staleness_weights"]), r
        for client, s in r["staleness"].items():
            assert r["staleness_weights"][client] == pytest.approx((1 + s) ** -0.5, rel=1e-12), r
    slow = [r["staleness"][SLOW] for r in metrics if SLOW in r["staleness"]]
    assert min(slow) >= 1, f"models were released while the slow client trained: {slow}"
