"""``compression.up`` over a real deployment (issue 17): ``fedtrain server``
and three ``fedtrain client`` processes (plain text, to stay fast); each
client encodes its update with its warm error-feedback state and sends the
int8 wire fields as raw bytes; the coordinator decodes them at intake.
``metrics.jsonl``'s ``bytes_up`` is the payloads' size (about a quarter of
float32) and matches what the coordinator's transport counted on the wire."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedtrain.compression import HEADER_BYTES, uncompressed_nbytes
from fedtrain.deploy.addresses import free_port

from deployed import Started, cli, rows

ROUNDS = 2
CLIENTS = 3
NUMEL = 64 * 128 + 128 + 128 * 10 + 10
"""The default MLP's parameters on digits."""
BLOCK = 256
INT8_NBYTES = HEADER_BYTES + NUMEL + 4 * -(-NUMEL // BLOCK)
"""One int8 payload: a code per value and a float32 scale per block."""
WIRE_LINE = re.compile(
    r"round (\d+) wire: sent (\d+) payload bytes in (\d+) messages, received (\d+) payload bytes in (\d+) replies"
)


def test_int8_updates_cross_a_deployment_compressed(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    sets = [
        "--set", f"run.rounds={ROUNDS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "client.timeout=60",
        "--set", "compression.up=int8",
    ]

    with Started(tmp_path) as started:
        server = started.start("server", cli("server", "--insecure", "--address", address, "--out", str(run_dir),
                                             "--quiet", "--wait", "120", *sets))
        for i in range(CLIENTS):
            started.start(f"client-{i}", cli("client", "--insecure", "--server", address, "--partition", str(i),
                                             "--connect-timeout", "120"))
        rc = server.wait(480)
    logs = started.all_logs()
    server_log = started.log("server")

    metrics = rows(run_dir)
    assert rc == 0, logs
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1)), logs
    assert all(r["num_clients"] == CLIENTS and r["num_failed"] == 0 for r in metrics), metrics
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == ROUNDS
    wire = {int(m[0]): tuple(int(v) for v in m[1:]) for m in WIRE_LINE.findall(server_log)}
    assert sorted(wire) == [r["round"] for r in metrics], server_log[-3000:]
    for row in metrics:
        assert row["bytes_up"] == CLIENTS * INT8_NBYTES, row
        assert CLIENTS * uncompressed_nbytes(NUMEL) / row["bytes_up"] > 3.9, row
        received = wire[row["round"]][2]
        assert abs(received - row["bytes_up"]) <= 0.05 * row["bytes_up"], (row["round"], received, row["bytes_up"])


def test_a_workers_error_feedback_lives_across_rounds_and_its_reply_parses(tmp_path: Path) -> None:
    """The warm worker keeps its residual between rounds: with topk and error
    feedback, round 2 sends what round 1 left out plus the new update; the
    reply the relay builds parses on the coordinator to the payload sent."""
    import numpy as np
    import torch

    from fedtrain import RoundPlan
    from fedtrain.compression import Compressed, decode
    from fedtrain.config import Compression, load, to_dict
    from fedtrain.deploy.worker import ClientWorker
    from fedtrain.privacy.policy import ClientPrivacy
    from fedtrain.run import client_data
    from fedtrain.training.train_task import TrainTask
    from fedtrain.transport import flower
    from fedtrain.transport.flower_client_app import _train_records
    from fedtrain.transport.relay import Hello

    config = load(None, ["data.num_clients=3", "strategy.clients_per_round=3", "compression.up=topk",
                         "compression.fraction=0.05"])
    data = client_data(config, torch.device("cpu"))
    worker = ClientWorker("0", "0", None, "cpu")
    worker.hello(Hello(to_dict(config), data.input_shape, data.num_classes))
    trainer = worker._setup[1]  # type: ignore[index]
    params = trainer.layout.flatten(trainer.model.state_dict()).numpy()
    task = json.dumps(TrainTask.of(config.client, RoundPlan(clients=("0",)), ClientPrivacy()).as_json())

    first = worker.train(1, task, params)
    assert first.update.size == 0 and first.compressed is not None
    store = worker._uplink.store  # type: ignore[union-attr]
    assert store is not None and len(store) == 1
    residual = store.get("0").clone()  # type: ignore[union-attr]
    assert float(residual.abs().max()) > 0

    payload, count, _ = flower.parse_train_reply(_train_records(first), params.size)
    assert isinstance(payload, Compressed) and payload.method is Compression.TOPK
    assert count == first.num_examples and payload.nbytes < uncompressed_nbytes(params.size) / 9
    sent = decode(payload, params.size)
    assert int((sent != 0).sum()) == round(0.05 * params.size)

    second = worker.train(2, task, params)
    assert second.compressed is not None
    assert not torch.equal(store.get("0"), residual)  # type: ignore[arg-type]
    assert np.isfinite(decode(flower.parse_train_reply(_train_records(second), params.size)[0],  # type: ignore[arg-type]
                              params.size).numpy()).all()
