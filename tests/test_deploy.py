"""Deployment end to end: real ``fedtrain server`` / ``fedtrain client``
processes on 127.0.0.1, with Flower's SuperLink and SuperNodes, TLS and
registered client keys.

One deployment (module fixture, started in the background as the session
begins: :func:`deployed.in_background`) is run once and looked at by several tests:
three registered clients train; a client with an unregistered key and a
plain-text client try to join and are refused; one client is killed after
the first round, the others go on without it, and it comes back (same key)
and trains again before the run ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtrain.certs import CertificateSet, add_client_key, create_certificates
from fedtrain.deploy.addresses import free_port

from fedtrain.deploy.processes import alive

from deployed import Started, background_result, cli, descendants, in_background, restart_client, rows


ROUNDS = 16
"""Enough rounds after the kill for the killed client to miss some and,
restarted at once (a fresh process: torch, data, SuperNode), to train
again: with ClientApps started warm a client's start-up lasts up to about
ten rounds on two busy cores."""


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _wait_for(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.5)


@dataclass(frozen=True)
class Deployment:
    run_dir: Path
    server_rc: int
    server_log: str
    stranger_rc: int
    stranger_log: str
    plain_rc: int
    plain_log: str
    leftovers: list[str]


@in_background("test_deploy", 80)
def deploy(root: Path) -> Deployment:
    """The module's deployment (see the module's docstring), started in the
    background as the session begins."""
    certs = create_certificates(root / "certs", ["127.0.0.1", "localhost"], 3)
    (root / "stranger").mkdir()
    stranger_key = add_client_key(CertificateSet(root / "stranger"), "client-9")
    port = free_port()
    server_address = f"127.0.0.1:{port}"
    run_dir = root / "run"
    with Started(root) as started:
        server = started.start("server", cli(
            "server", "--certs", str(certs.root), "--address", server_address, "--out", str(run_dir),
            "--quiet", "--wait", "180",
            "--set", f"run.rounds={ROUNDS}", "--set", "data.num_clients=3",
            "--set", "strategy.clients_per_round=3", "--set", "strategy.min_clients=2",
            "--set", "client.timeout=30",
        ))
        clients = [
            started.start(f"client-{i}", cli(
                "client", "--server", server_address, "--certs", str(certs.root),
                "--key", str(certs.root / f"client-{i + 1}"), "--partition", str(i),
            ))
            for i in range(3)
        ]
        stranger = started.start("stranger", cli(
            "client", "--server", server_address, "--certs", str(certs.root), "--key", str(stranger_key),
            "--partition", "0", "--connect-timeout", "120",  # the Fleet address opens once every key is registered
        ))
        plain = started.start("plain", cli(
            "client", "--server", server_address, "--insecure", "--partition", "0", "--connect-timeout", "10",
        ))
        stranger.wait(180)
        plain.wait(180)
        _wait_for(lambda: len(rows(run_dir)) >= 1 or server.poll() is not None, 300, "the first round")
        killed = descendants(clients[2].pid)
        os.killpg(clients[2].pid, signal.SIGKILL)
        _wait_for(lambda: not any(map(alive, killed)), 60, "the killed client's SuperNode to end")
        restart_client(started, "client-2-again", cli(
            "client", "--server", server_address, "--certs", str(certs.root),
            "--key", str(certs.root / "client-3"), "--partition", "2",
        ))
        server.wait(500)
    time.sleep(1.0)
    return Deployment(
        run_dir=run_dir,
        server_rc=server.returncode,
        server_log=started.log("server"),
        stranger_rc=stranger.returncode,
        stranger_log=started.log("stranger"),
        plain_rc=plain.returncode,
        plain_log=started.log("plain"),
        leftovers=_processes_mentioning(server_address),
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return background_result("test_deploy", tmp_path_factory.mktemp)


def test_deployed_run_finishes_and_writes_the_run_folder(deployment: Deployment) -> None:
    assert deployment.server_rc == 0, deployment.server_log
    for name in ("metrics.jsonl", "summary.json", "model.pt", "curves.png", "config.toml"):
        assert (deployment.run_dir / name).is_file(), name
    metrics = rows(deployment.run_dir)
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))


def test_deployed_model_improves(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    assert metrics[0]["num_clients"] == 3
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]


def test_killed_client_is_recorded_and_the_others_go_on(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    without = [r for r in metrics if r["num_failed"]]
    assert without, "no round recorded the killed client"
    assert all(r["num_clients"] == 2 and list(r["failures"]) == ["2"] for r in without)


def test_client_that_comes_back_trains_again(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    first_failure = next(i for i, r in enumerate(metrics) if r["num_failed"])
    assert any(r["num_clients"] == 3 for r in metrics[first_failure:])
    assert metrics[-1]["num_clients"] == 3


def test_unregistered_client_is_refused_on_both_sides(deployment: Deployment) -> None:
    assert deployment.stranger_rc != 0
    assert "not registered" in deployment.stranger_log
    assert "key is not registered" in deployment.server_log


def test_plain_text_client_is_refused(deployment: Deployment) -> None:
    assert deployment.plain_rc != 0
    assert "plain text" in deployment.plain_log


def test_every_process_is_cleaned_up(deployment: Deployment) -> None:
    assert deployment.leftovers == []


@dataclass(frozen=True)
class FailedRun:
    done: subprocess.CompletedProcess[str]
    leftovers: list[str]


@in_background("test_deploy::test_failed_run_exits_non_zero_with_the_reason", 15)
def deploy_failing(root: Path) -> FailedRun:
    """A coordinator that no client joins within ``--wait``."""
    port = free_port()
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
    done = subprocess.run(
        cli("server", "--insecure", "--address", f"127.0.0.1:{port}", "--out", str(root / "run"),
             "--quiet", "--wait", "2", "--set", "strategy.min_clients=2"),
        env=env, capture_output=True, text=True, timeout=300,
    )
    return FailedRun(done, _processes_mentioning(f"127.0.0.1:{port}"))


def test_failed_run_exits_non_zero_with_the_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    failed = background_result("test_deploy::test_failed_run_exits_non_zero_with_the_reason", tmp_path_factory.mktemp)

    assert failed.done.returncode != 0
    assert "joined" in failed.done.stderr
    assert failed.leftovers == []


def test_server_without_certificates_is_refused_before_starting(tmp_path: Path) -> None:
    done = subprocess.run(cli("server", "--certs", str(tmp_path / "none")), capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 2
    assert "missing" in done.stderr and "fedtrain certs" in done.stderr


WIRE_LINE = re.compile(
    r"round (\d+) wire: sent (\d+) payload bytes in (\d+) messages, received (\d+) payload bytes in (\d+) replies"
)
NUMEL = 64 * 128 + 128 + 128 * 10 + 10
"""The default MLP's parameters on digits."""


def test_payload_bytes_on_the_wire_match_the_updates(deployment: Deployment) -> None:
    """What crosses the wire (issue 17): the coordinator's transport counts
    the payload bytes of every message it pushes through Flower's grid and
    every reply it pulls (:func:`fedtrain.transport.flower.record_bytes`,
    logged per round); they match 4 × numel per model sent and per update
    received within 5 %, and ``metrics.jsonl``'s ``bytes_up`` /
    ``bytes_down`` (in the rounds where a message reached every planned
    client), also within 5 %."""
    wire = {int(m[0]): tuple(int(v) for v in m[1:]) for m in WIRE_LINE.findall(deployment.server_log)}
    metrics = rows(deployment.run_dir)
    assert sorted(wire) == [r["round"] for r in metrics], deployment.server_log[-3000:]
    for row in metrics:
        sent, messages, received, _ = wire[row["round"]]
        assert abs(sent - 4 * NUMEL * messages) <= 0.05 * 4 * NUMEL * messages, (row["round"], sent, messages)
        expected = 4 * NUMEL * row["num_clients"]
        assert abs(received - expected) <= 0.05 * expected, (row["round"], received, expected)
        assert abs(received - row["bytes_up"]) <= 0.05 * row["bytes_up"], (received, row["bytes_up"])
        if messages == row["num_clients"] + row["num_failed"]:  # the engine counts every planned client
            assert abs(sent - row["bytes_down"]) <= 0.05 * row["bytes_down"], (sent, row["bytes_down"])
