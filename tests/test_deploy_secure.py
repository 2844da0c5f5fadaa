"""Secure aggregation in a real deployment: ``fedtrain server`` and three
``fedtrain client`` processes (plain text, to stay fast) run SecAgg+ over
Flower messages; the run completes with every client in every round's sum,
and the model learns."""

from __future__ import annotations

import json
from pathlib import Path

from fedtrain.deploy.addresses import free_port

from deployed import Started, cli, rows

ROUNDS = 3
CLIENTS = 3


def test_secure_aggregation_runs_over_the_deployment(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    sets = [
        "--set", f"run.rounds={ROUNDS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "client.timeout=60",
        "--set", "secure.aggregation=true",
    ]

    with Started(tmp_path) as started:
        server = started.start("server", cli("server", "--insecure", "--address", address, "--out", str(run_dir),
                                             "--quiet", "--wait", "120", *sets))
        for i in range(CLIENTS):
            started.start(f"client-{i}", cli("client", "--insecure", "--server", address, "--partition", str(i),
                                             "--connect-timeout", "120"))
        rc = server.wait(480)
    logs = started.all_logs()

    metrics = rows(run_dir)
    assert rc == 0, logs
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1)), logs
    assert all(r["num_clients"] == CLIENTS and r["num_failed"] == 0 for r in metrics), metrics
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"], metrics
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
