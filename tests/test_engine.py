"""The round loop: bad updates and failing clients are dropped, the round goes on."""

from __future__ import annotations

import torch

from typing import Sequence

from fedtrain import ClientUpdate, Strategy, load_strategy
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig
from fedtrain.types import ClientFailure, RoundOutcome
from fedtrain.engine import Engine, RngStreams
from fedtrain.sampling import UniformSampler
from fedtrain.types import Evaluation


class ScriptedBackend:
    """Returns, per client id, a fixed update vector (or a failure)."""

    def __init__(self, vectors: dict[str, torch.Tensor | str]) -> None:
        self.vectors = vectors

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        updates, failures = [], []
        for cid in clients:
            v = self.vectors[cid]
            if isinstance(v, str):
                failures.append(ClientFailure(cid, v))
            else:
                updates.append(ClientUpdate(cid, v, num_examples=1))
        return RoundOutcome(tuple(updates), tuple(failures))


def _engine(vectors: dict[str, torch.Tensor | str], strategy: Strategy, min_clients: int = 1) -> Engine:
    return Engine(
        strategy=strategy,
        executor=ScriptedBackend(vectors),
        sampler=UniformSampler(len(vectors)),
        evaluate=lambda p: Evaluation({"accuracy": 0.5, "loss": float(p.sum())}, num_examples=1),
        clients=tuple(vectors),
        client=ClientConfig(),
        min_clients=min_clients,
        rngs=RngStreams.from_seed(0),
    )


def test_malformed_updates_are_rejected_and_the_round_goes_on() -> None:
    good = torch.ones(3)
    vectors: dict[str, torch.Tensor | str] = {
        "good": good,
        "nan": torch.tensor([1.0, float("nan"), 0.0]),
        "short": torch.ones(2),
        "double": torch.ones(3, dtype=torch.float64),
        "crashed": "RuntimeError: boom",
    }
    engine = _engine(vectors, load_strategy("fedavg"))

    params, record = engine.run_round(1, torch.zeros(3))

    assert torch.equal(params, good)
    assert record.num_clients == 1
    assert record.num_failed == 4


def test_round_is_skipped_below_min_clients_and_the_model_kept() -> None:
    vectors: dict[str, torch.Tensor | str] = {"a": torch.ones(3), "b": "timeout", "c": "timeout"}
    engine = _engine(vectors, load_strategy("fedavg"), min_clients=2)
    start = torch.full((3,), 2.0)

    params, record = engine.run_round(1, start)

    assert torch.equal(params, start)
    assert (record.num_clients, record.num_failed) == (1, 2)
    assert record.train_loss is None


def test_run_numbers_rounds_and_tells_observers() -> None:
    seen: list[int] = []

    class Observer:
        def on_round(self, record, params):  # noqa: ANN001, ANN202
            seen.append(record.round)

    engine = _engine({"a": torch.ones(2)}, load_strategy("fedavg"))

    params, records, stopped = engine.run(torch.zeros(2), rounds=3, observers=[Observer()])

    assert stopped is None
    assert [r.round for r in records] == seen == [1, 2, 3]
    assert torch.equal(params, torch.full((2,), 3.0))
