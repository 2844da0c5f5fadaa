"""Simulated clients that hang, raise or return garbage: each is a failure, the run goes on."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pytest
import torch

from fedtrain import ParamLayout
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig, ConfigError
from fedtrain.data.clients import PartitionedData
from fedtrain.deadline import ClientTimeout, call_with_timeout
from fedtrain.engine import Engine, RngStreams
from fedtrain.models import mlp
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.sampling import UniformSampler
from fedtrain import config, load_strategy


class FaultyData:
    """Eight clients of random data; client "hang" sleeps, client "boom" raises."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(80, 6, generator=g), torch.randint(0, 3, (80,), generator=g)
        self.inner = PartitionedData(x, y, {str(i): np.arange(i * 10, i * 10 + 10) for i in range(6)},
                                     torch.device("cpu"))
        self._ids = tuple(self.inner.ids) + ("hang", "boom")

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def size(self, client_id: str) -> int:
        return 10

    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        if client_id == "hang":
            time.sleep(30)
        if client_id == "boom":
            raise RuntimeError("disk on fire")
        return self.inner.load(client_id)


@pytest.mark.parametrize("backend_kind", ["sequential", "batched"])
def test_hanging_and_raising_clients_fail_and_the_round_completes(backend_kind: str) -> None:
    model = mlp((6,), 3, hidden=8)
    layout = ParamLayout.of(model.state_dict())
    trainer = LocalTrainer(model, layout, torch.device("cpu"))
    data = FaultyData()
    backend = (SequentialExecutor(trainer, data, seed=0, timeout=1.0) if backend_kind == "sequential"
               else BatchedExecutor(trainer, data, seed=0, timeout=1.0))
    task = TrainTask(epochs=1, batch_size=4, lr=0.1, privacy=ClientPrivacy())
    SequentialExecutor(trainer, data, seed=0).train_round(
        0, ["0"], task, layout.flatten(model.state_dict())
    )  # warm-up without a limit: the first optimiser step imports lazily (~2 s)
    started = time.monotonic()

    outcome = backend.train_round(1, list(data.ids), task, layout.flatten(model.state_dict()))

    assert time.monotonic() - started < 20
    assert sorted(u.client_id for u in outcome.updates) == [str(i) for i in range(6)]
    reasons = {f.client_id: f.reason for f in outcome.failures}
    assert "client.timeout = 1.0" in reasons["hang"]
    assert "disk on fire" in reasons["boom"]


def test_engine_records_the_failures_and_aggregates_the_rest() -> None:
    model = mlp((6,), 3, hidden=8)
    layout = ParamLayout.of(model.state_dict())
    data = FaultyData()
    trainer = LocalTrainer(model, layout, torch.device("cpu"))
    SequentialExecutor(trainer, data, seed=0).train_round(
        0, ["0"], TrainTask(epochs=1, batch_size=4, lr=0.1), layout.flatten(model.state_dict())
    )  # warm-up: the first optimiser step imports lazily
    engine = Engine(
        strategy=load_strategy("fedavg"),
        executor=SequentialExecutor(trainer, data, seed=0, timeout=1.0),
        sampler=UniformSampler(8),
        evaluate=lambda p: __import__("fedtrain").Evaluation({"accuracy": 0.0, "loss": 0.0}, 1),
        clients=data.ids,
        client=ClientConfig(batch_size=4, lr=0.1),
        min_clients=1,
        rngs=RngStreams.from_seed(0),
    )

    _, record = engine.run_round(1, layout.flatten(model.state_dict()))

    assert (record.num_clients, record.num_failed) == (6, 2)


def test_call_with_timeout_gives_up_returns_or_reraises() -> None:
    with pytest.raises(ClientTimeout):
        call_with_timeout(lambda: time.sleep(5), 0.2)
    with pytest.raises(KeyError):
        call_with_timeout(lambda: {}["x"], 1.0)

    assert call_with_timeout(lambda: 3, 1.0) == 3
    assert call_with_timeout(lambda: 4, 0) == 4


def test_negative_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="client.timeout = -1.0"):
        config.load(None, ["client.timeout=-1"])
