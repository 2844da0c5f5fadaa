"""``client.timeout`` bounds the batched engine's training too: a chunk past
it fails its clients with the reason, and the round (and the run) goes on."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout, config
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.data.clients import PartitionedData
from fedtrain.deadline import ClientTimeout, Deadline
from fedtrain.models import mlp
from fedtrain.results import read_metrics
from fedtrain.simulation import simulate


def _data(records: int) -> PartitionedData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * records, 6, generator=g), torch.randint(0, 3, (8 * records,), generator=g)
    parts = {str(i): np.arange(i * records, (i + 1) * records) for i in range(8)}
    return PartitionedData(x, y, parts, torch.device("cpu"))


@pytest.mark.parametrize("records", [3, 20])  # all in one batch (one plan, repeated) / shuffled every epoch
def test_a_chunk_past_the_timeout_fails_its_clients_and_the_round_goes_on(records: int) -> None:
    model = mlp((6,), 3, hidden=8)
    layout = ParamLayout.of(model.state_dict())
    params = layout.flatten(model.state_dict())
    backend = BatchedExecutor(LocalTrainer(model, layout, torch.device("cpu")), _data(records), seed=0,
                             max_batch_clients=4, timeout=1.0, strict=True)
    backend.train_round(0, ["0", "1"], TrainTask(epochs=1, batch_size=4, lr=0.1), params)  # warm-up, probe
    started = time.monotonic()

    outcome = backend.train_round(1, [str(i) for i in range(8)], TrainTask(epochs=100_000, batch_size=4, lr=0.1),
                                  params)

    elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed  # two chunks of 4, each stopped after ~1 s
    assert outcome.updates == ()
    assert {f.client_id: f.reason for f in outcome.failures} == {
        str(i): "took longer than client.timeout = 1.0 s" for i in range(8)
    }
    quick = backend.train_round(2, ["0", "1", "2"], TrainTask(epochs=1, batch_size=4, lr=0.1), params)
    assert len(quick.updates) == 3 and not quick.failures


def test_a_simulation_with_endless_local_epochs_finishes_and_records_the_timeouts(tmp_path: Path) -> None:
    cfg = config.load(None, [
        "data.num_clients=4", "strategy.clients_per_round=4", "run.rounds=2", "client.engine=batched",
        "client.epochs=100000", "client.timeout=1.5", "model.hidden=16",
    ])
    started = time.monotonic()

    result = simulate(cfg, out_dir=tmp_path)

    assert time.monotonic() - started < 9
    rows = read_metrics(tmp_path)
    assert [r["num_clients"] for r in rows] == [0, 0]
    assert all(r["failures"] == {str(i): "took longer than client.timeout = 1.5 s" for i in range(4)} for r in rows)
    assert len(result.records) == 2


def test_a_deadline_of_zero_never_expires_and_a_passed_one_raises() -> None:
    Deadline(0).check()
    passed = Deadline(0.01)
    time.sleep(0.02)
    assert passed.expired()
    with pytest.raises(ClientTimeout, match="client.timeout = 0.01 s"):
        passed.check()
