"""Asynchronous training in a real deployment: ``fedtrain server`` and three
TLS ``fedtrain client`` processes with registered keys, ``run.mode =
"async"`` (FedBuff over Flower messages), one client answering every job
``DELAY`` seconds late (``--delay``). The coordinator aggregates the two fast
clients' updates without waiting for the slow one, takes the slow one's
stale updates when they come, and weights each by ``1/√(1+s)``. A fast
client (``KILLED_DELAY`` seconds a job) is killed after aggregation
``KILL_AFTER``, while it holds a job: its lost job is recorded (once Flower
knows its SuperNode is gone) and the others go on; restarted with its key,
it trains again. The slow client's checks look at the aggregations before
the kill. The run starts in the background as the session begins
(:func:`deployed.in_background`)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedtrain.certs import create_certificates
from fedtrain.deploy.addresses import free_port

from fedtrain.deploy.processes import alive
from fedtrain.deploy.worker import HELD_JOB

from deployed import Started, background_result, cli, descendants, in_background, restart_client, rows, wait_for

AGGREGATIONS = 26
KILL_AFTER = 10
CLIENTS = 3
DELAY = 4.0
SLOW = "2"
"""The id of the slow client (the partition it trains on)."""
KILLED = "1"
"""The id of the fast client that is killed and restarted."""
KILLED_DELAY = 1.0
"""``--delay`` of the client that is killed: it is killed as soon as its
log says a job of its arrived, so the kill lands while it holds that job.
Killed at any other time, it could have answered its last job (and, gone,
get no other: a client that is not connected gets no work), leaving no lost
job to record, or be in the middle of uploading its reply."""


@dataclass(frozen=True)
class Deployment:
    rc: int
    logs: str
    run_dir: Path


@in_background("test_deploy_async", 90)
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
        def command(i: int) -> list[str]:
            delay = {SLOW: DELAY, KILLED: KILLED_DELAY}.get(str(i))
            delayed = [] if delay is None else ["--delay", str(delay)]
            return cli(
                "client", "--server", address, "--certs", str(certs.root), "--key", str(certs.root / f"client-{i + 1}"),
                "--partition", str(i), "--connect-timeout", "120", *delayed,
            )

        clients = [started.start(f"client-{i}", command(i)) for i in range(CLIENTS)]
        wait_for(lambda: len(rows(run_dir)) >= KILL_AFTER or server.poll() is not None, 300, "the first aggregations")
        jobs = started.log(f"client-{KILLED}").count(HELD_JOB)
        wait_for(lambda: started.log(f"client-{KILLED}").count(HELD_JOB) > jobs or server.poll() is not None, 60,
                 "the client to be killed to take a job", every=0.05)
        killed = descendants(clients[int(KILLED)].pid)
        os.killpg(clients[int(KILLED)].pid, signal.SIGKILL)
        wait_for(lambda: not any(map(alive, killed)), 60, "the killed client's SuperNode to end")
        wait_for(lambda: any(KILLED in r["failures"] for r in rows(run_dir)) or server.poll() is not None, 120,
                 "the killed client's lost job")
        restart_client(started, f"client-{KILLED}-again", command(int(KILLED)))
        rc = server.wait(400)
    return Deployment(rc, started.all_logs(), run_dir)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return background_result("test_deploy_async", tmp_path_factory.mktemp)


def test_the_asynchronous_deployment_completes_every_aggregation(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    assert deployment.rc == 0, deployment.logs
    assert [r["round"] for r in metrics] == list(range(1, AGGREGATIONS + 1)), deployment.logs
    assert all(1 <= r["num_clients"] <= 2 for r in metrics), metrics
    assert all(set(r["failures"]) <= {KILLED} for r in metrics), metrics
    assert all("virtual_time" not in r for r in metrics), "a deployment runs on the real clock"
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"], metrics
    assert json.loads((deployment.run_dir / "summary.json").read_text())["rounds"] == AGGREGATIONS


def _before_the_kill(deployment: Deployment) -> list[dict[str, Any]]:
    return [r for r in rows(deployment.run_dir) if r["round"] <= KILL_AFTER]


def test_aggregations_do_not_wait_for_the_slow_client(deployment: Deployment) -> None:
    metrics = _before_the_kill(deployment)
    with_slow = [r["round"] for r in metrics if SLOW in r["staleness"]]
    assert with_slow, f"the slow client's updates never arrived: {metrics}"
    assert with_slow[0] >= 2, f"the first aggregation waited for the slow client: {with_slow}"
    fast = [sum(1 for r in metrics if c in r["staleness"]) for c in ("0", "1")]
    assert all(n > len(with_slow) for n in fast), (fast, with_slow)


def test_stale_updates_are_weighted_one_over_root_of_one_plus_staleness(deployment: Deployment) -> None:
    for r in rows(deployment.run_dir):
        assert set(r["staleness"]) == set(r["staleness_weights"]), r
        for client, s in r["staleness"].items():
            assert r["staleness_weights"][client] == pytest.approx((1 + s) ** -0.5, rel=1e-12), r
    metrics = _before_the_kill(deployment)
    slow = [r["staleness"][SLOW] for r in metrics if SLOW in r["staleness"]]
    assert min(slow) >= 1, f"models were released while the slow client trained: {slow}"


def test_a_killed_client_is_recorded_the_others_go_on_and_it_rejoins(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    failed = [r["round"] for r in metrics if KILLED in r["failures"]]
    assert failed, f"the killed client's lost job is not recorded: {metrics}"
    assert failed[0] > KILL_AFTER, failed
    after = [r["round"] for r in metrics if r["round"] > failed[0] and KILLED in r["staleness"]]
    assert after, f"the restarted client never trained again: {metrics}"
    assert len(failed) <= 2, f"a client that is gone must not fill the buffers with failures: {failed}"
