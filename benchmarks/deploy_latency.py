"""Deployment latency: seconds per round over 127.0.0.1 that are not the
clients' training, with TLS on and off, under Flower's default polling and
fedtrain's, all in the same run.

Each configuration runs a real ``fedtrain server`` and ``--clients`` real
``fedtrain client`` processes (Flower SuperLink, SuperNodes, ClientApp per
message) for ``--rounds`` rounds on digits, one partition per client, every
client in every round. A round's seconds are the engine's (from sampling to
the evaluated new model, ``metrics.jsonl``); the reference is the same config
run in process by ``simulate`` in the same run, whose rounds are all
training and evaluation. Overhead = median deployed round − median simulated
round; the first round (hello, data loading, model building) is left out of
both medians and reported on its own.

Polling: ``--poll 3`` gives Flower's defaults (SuperNode idle poll 3 s,
SuperExec task poll 1 s, ``Grid.send_and_receive`` 3 s); fedtrain's default
``--poll 0.1`` shortens all three.

    python benchmarks/deploy_latency.py [--quick] [--rounds R] [--clients N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import report, revision, table

from fedtrain import config as config_mod
from fedtrain.certs import create_certificates
from fedtrain.deploy.addresses import free_port
from fedtrain.transport.flower import DEFAULT_POLL
from fedtrain.simulation import simulate


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrain.cli", *args]


def _overrides(rounds: int, clients: int) -> list[str]:
    return [f"run.rounds={rounds}", f"data.num_clients={clients}", f"strategy.clients_per_round={clients}",
            "data.partition=iid", "client.epochs=1"]


def deployed_rounds(root: Path, tls: bool, poll: float, rounds: int, clients: int) -> list[float]:
    """Seconds of each round of one real deployment."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    run_dir = root / f"run-{'tls' if tls else 'plain'}-{poll}"
    security = ["--certs", str(root / "certs")] if tls else ["--insecure"]
    sets = [x for o in _overrides(rounds, clients) for x in ("--set", o)]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
    logs = root / f"logs-{'tls' if tls else 'plain'}-{poll}"
    logs.mkdir()

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as out:
            return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    procs = [start("server", _cli(
        "server", *security, "--address", address, "--out", str(run_dir), "--quiet", "--poll", str(poll), *sets
    ))]
    for i in range(clients):
        key = ["--key", str(root / "certs" / f"client-{i + 1}")] if tls else []
        procs.append(start(f"client-{i}", _cli(
            "client", "--server", address, *security, *key, "--partition", str(i), "--poll", str(poll)
        )))
    try:
        if procs[0].wait(900) != 0:
            raise RuntimeError(f"fedtrain server failed:\n{(logs / 'server.log').read_text()[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows]


def simulated_rounds(rounds: int, clients: int) -> list[float]:
    cfg = config_mod.load(None, _overrides(rounds, clients))
    return [r.seconds for r in simulate(cfg).records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, TLS only")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    settings = [(True, DEFAULT_POLL), (True, 3.0)] if args.quick else [
        (True, 3.0), (False, 3.0), (True, DEFAULT_POLL), (False, DEFAULT_POLL)
    ]
    reference = simulated_rounds(rounds, args.clients)
    train = statistics.median(reference[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        create_certificates(root / "certs", ["127.0.0.1", "localhost"], args.clients)
        for tls, poll in settings:
            started = time.perf_counter()
            seconds = deployed_rounds(root, tls, poll, rounds, args.clients)
            steady = statistics.median(seconds[1:])
            rows.append([
                "TLS + client keys" if tls else "plain text",
                "Flower defaults (--poll 3)" if poll >= 3 else f"fedtrain (--poll {poll:g})",
                round(seconds[0], 2), round(steady, 2), round(steady - train, 2),
                round(time.perf_counter() - started, 1),
            ])
    body = table(
        ["transport", "polling", "round 1 s", "median round s", "overhead s/round", "whole run s"], rows
    )
    report(
        "deploy_latency_quick" if args.quick else "deploy_latency",
        f"Deployment latency over 127.0.0.1: {args.clients} clients, {rounds} rounds",
        body,
        [
            f"in-process reference (simulate, same config): median round {train:.3f} s "
            "(training + evaluation); overhead = median deployed round − this",
            "whole run: fedtrain server start to exit (SuperLink start, key registration, flwr run, "
            "client hello, all rounds, status check)",
            revision(),
        ],
    )


if __name__ == "__main__":
    main()
