"""BatchedExecutor: a cohort trained at once gives the sequential backend's updates."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from fedtrain import ParamLayout, UpdateKind
from fedtrain.aggregation import stack
from fedtrain.training.batched import BatchedExecutor, stacked_optimizer
from fedtrain.training.optimizer import LocalOptimizer
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.config import GradSampleMode, Optimizer, Partition
from fedtrain.data import partition
from fedtrain.data.clients import PartitionedData, partitions_by_id
from fedtrain.types import RoundOutcome
from fedtrain.models import cnn, mlp
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(num_clients: int = 12, records: int = 400, seed: int = 0) -> PartitionedData:
    """Random 64-feature, 10-class records split unevenly (Dirichlet): clients
    of very different sizes, some smaller than a batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(records, 64, generator=g)
    y = torch.randint(0, 10, (records,), generator=g)
    parts = partition(Partition.DIRICHLET, y.numpy(), num_clients, np.random.default_rng(seed), alpha=0.1)
    return PartitionedData(x, y, partitions_by_id(parts), CPU)


def _mlp() -> nn.Module:
    return mlp((64,), 10, hidden=32)


def _trainer(factory: Callable[[], nn.Module] = _mlp) -> LocalTrainer:
    """A trainer of a fresh model, the same initial weights every time."""
    torch.manual_seed(0)
    model = factory()
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU)


def _both(
    task: TrainTask, data: PartitionedData, model: Callable[[], nn.Module] = _mlp, rnd: int = 3,
    clients: Sequence[str] | None = None, options: Mapping[str, Any] | None = None,
) -> tuple[RoundOutcome, RoundOutcome, torch.Tensor]:
    """The same round through SequentialExecutor and BatchedExecutor (separate models)."""
    seq_trainer = _trainer(model)
    batched_trainer = _trainer(model)
    params = seq_trainer.layout.flatten(seq_trainer.model.state_dict())
    cohort = list(clients if clients is not None else data.ids)
    seq = SequentialExecutor(seq_trainer, data, seed=7).train_round(rnd, cohort, task, params)
    backend = BatchedExecutor(batched_trainer, data, seed=7, **(options or {}))
    batched = backend.train_round(rnd, cohort, task, params)
    return seq, batched, params


def _assert_same(seq: RoundOutcome, batched: RoundOutcome) -> None:
    assert [u.client_id for u in batched.updates] == [u.client_id for u in seq.updates]
    assert [u.num_examples for u in batched.updates] == [u.num_examples for u in seq.updates]
    assert [u.kind for u in batched.updates] == [u.kind for u in seq.updates]
    assert batched.failures == seq.failures
    expected, got = stack(seq.updates), stack(batched.updates)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(scale, 1.0))
    for s, b in zip(seq.updates, batched.updates):
        assert b.metrics.keys() == s.metrics.keys()
        for key in s.metrics:
            assert b.metrics[key] == pytest.approx(s.metrics[key], rel=1e-5, abs=1e-6)


def _task(**changes: object) -> TrainTask:
    base: dict[str, object] = dict(epochs=2, batch_size=8, lr=0.1)
    base.update(changes)
    return TrainTask(**base)  # type: ignore[arg-type]


TASKS: Mapping[str, TrainTask] = {
    "sgd": _task(),
    "momentum+weight_decay": _task(momentum=0.9, weight_decay=1e-3),
    "adam": _task(optimizer=Optimizer.ADAM, lr=0.01, weight_decay=1e-4),
    "fedprox": _task(proximal_mu=0.5, momentum=0.5),
    "gradient": _task(kind=UpdateKind.GRADIENT, batch_size=7),
    "user_clip": _task(privacy=ClientPrivacy(clip=0.5)),
    "dp_sgd": _task(
        momentum=0.5,
        proximal_mu=0.1,
        privacy=ClientPrivacy(
            dp_sgd=DpSgdTask(noise_multiplier=1.1, max_grad_norm=0.5, mode=GradSampleMode.HOOKS, secure_noise=False)
        ),
    ),
    "dp_sgd+clip": _task(
        privacy=ClientPrivacy(
            clip=0.05,
            dp_sgd=DpSgdTask(noise_multiplier=0.7, max_grad_norm=1.0, mode=GradSampleMode.EW, secure_noise=False),
        ),
    ),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_batched_updates_equal_sequential(name: str, caplog: pytest.LogCaptureFixture) -> None:
    data = _data()
    sizes = sorted(data.size(c) for c in data.ids)
    assert sizes[0] < 8 < sizes[-1] // 4  # ragged: partial batches and very different step counts

    with caplog.at_level(logging.WARNING):
        seq, batched, _ = _both(TASKS[name], data)

    _assert_same(seq, batched)
    assert not caplog.records  # it really ran batched
    if name == "user_clip":
        assert {u.metrics["unclipped"] for u in batched.updates} == {0.0, 1.0}
    if name == "sgd":
        assert all("train_loss" in u.metrics for u in batched.updates)


def _frozen_first_layer() -> nn.Module:
    model = mlp((64,), 10, hidden=32)
    model[1].requires_grad_(False)
    return model


@pytest.mark.parametrize("name", ["sgd", "fedprox", "gradient"])
def test_frozen_parameters_stay_put_batched_as_sequential(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        seq, batched, _ = _both(TASKS[name], _data(), model=_frozen_first_layer)

    _assert_same(seq, batched)
    assert not caplog.records
    frozen = 32 * 64 + 32  # the first Linear's weight and bias lead the layout
    assert not stack(batched.updates)[:, :frozen].any()


def test_dp_sgd_with_secure_noise_runs_batched(caplog: pytest.LogCaptureFixture) -> None:
    task = TASKS["dp_sgd"]
    assert task.privacy.dp_sgd is not None
    secure = dataclasses.replace(
        task, privacy=ClientPrivacy(dp_sgd=dataclasses.replace(task.privacy.dp_sgd, secure_noise=True))
    )
    data = _data()
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())
    backend = BatchedExecutor(trainer, data, seed=7)

    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        first = stack(backend.train_round(1, list(data.ids), secure, params).updates).clone()
        second = stack(backend.train_round(1, list(data.ids), secure, params).updates)

    assert not caplog.records
    assert torch.isfinite(first).all()
    assert not torch.equal(first, second)  # same seeds, fresh secret noise


@pytest.mark.parametrize("options", [{"max_batch_clients": 2}, {"memory_budget": 1}])  # chunks of 2, of 1
def test_small_chunks_and_a_subset_cohort_give_the_same_updates(options: dict[str, int]) -> None:
    data = _data()
    cohort = [data.ids[i] for i in (5, 0, 9, 3, 7)]

    seq, batched, _ = _both(_task(momentum=0.9), data, clients=cohort, options={"min_batch_clients": 1, **options})

    _assert_same(seq, batched)


def test_updates_are_consecutive_rows_of_one_buffer() -> None:
    data = _data()
    _, batched, params = _both(_task(), data)

    view = stack(batched.updates)
    assert view.data_ptr() == batched.updates[0].vector.data_ptr()
    assert view.shape == (len(data.ids), params.numel())


class _FlakyData(PartitionedData):
    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        if client_id == "2":
            raise OSError("disk on fire")
        return super().load(client_id)


def test_a_failing_client_is_a_failure_and_the_round_goes_on() -> None:
    base = _data()
    data = _FlakyData(base.x, base.y, {c: base._indices[c].numpy() for c in base.ids}, CPU)

    seq, batched, _ = _both(_task(), data, clients=["0", "1", "2", "3", "nobody"], options={"min_batch_clients": 2})

    _assert_same(seq, batched)
    assert [f.client_id for f in batched.failures] == ["2", "nobody"]
    assert "OSError: disk on fire" in batched.failures[0].reason
    assert stack(batched.updates).data_ptr() == batched.updates[0].vector.data_ptr()


class _OddShapeData(PartitionedData):
    def load(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().load(client_id)
        return (x[:, :63], y) if client_id == "4" else (x, y)


def test_a_chunk_that_cannot_be_stacked_trains_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    base = _data()
    data = _OddShapeData(base.x, base.y, {c: base._indices[c].numpy() for c in base.ids}, CPU)

    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        seq, batched, _ = _both(_task(), data)

    _assert_same(seq, batched)
    assert [f.client_id for f in batched.failures] == ["4"]  # the model cannot take its records
    assert "training them one by one" in caplog.records[0].getMessage()


def _batchnorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _no_stats_batchnorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(), nn.Linear(16, 10))


def _dropout_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10))


@pytest.mark.parametrize(
    "factory, reason",
    [
        (_batchnorm_model, "torch.func cannot run the model"),  # running statistics updated in place
        (_no_stats_batchnorm_model, "updates differ"),  # batch statistics see the padding
    ],
)
def test_batchnorm_models_fall_back_to_sequential(
    factory: Callable[[], nn.Module], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = _data()
    # A last batch of one record cannot run BatchNorm in training mode: leave those clients out.
    cohort = [c for c in data.ids if data.size(c) % 8 != 1]
    trainer = _trainer(factory)
    params = trainer.layout.flatten(trainer.model.state_dict())
    backend = BatchedExecutor(trainer, data, seed=7)

    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        first = backend.train_round(3, cohort, _task(), params)
        _assert_same(SequentialExecutor(_trainer(factory), data, seed=7).train_round(3, cohort, _task(), params), first)
        second = backend.train_round(4, cohort, _task(), params)  # reuses the first round's buffer

    assert len(second.updates) == len(cohort)
    assert len(caplog.records) == 1  # the reason, once
    assert "training one by one" in caplog.records[0].getMessage()
    assert reason in caplog.records[0].getMessage()


def test_dropout_model_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    data = _data()
    trainer = _trainer(_dropout_model)
    params = trainer.layout.flatten(trainer.model.state_dict())

    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        outcome = BatchedExecutor(trainer, data, seed=7).train_round(1, list(data.ids), _task(), params)

    assert len(outcome.updates) == len(data.ids)
    assert "unsupported" in caplog.records[0].getMessage()
    strict = BatchedExecutor(_trainer(_dropout_model), data, seed=7, strict=True)
    with pytest.raises(ValueError, match="batched clients unsupported for train tasks"):
        strict.train_round(1, list(data.ids), _task(), params)


def _layernorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 10))


def _cnn() -> nn.Module:
    return cnn((64,), 10, hidden=16)


@pytest.mark.parametrize(
    "factory, task",
    [(_cnn, _task(momentum=0.9)), (_layernorm_model, TASKS["dp_sgd"])],
    ids=["cnn-groupnorm", "layernorm-dp_sgd"],
)
def test_per_sample_normalisation_runs_batched(
    factory: Callable[[], nn.Module], task: TrainTask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        seq, batched, _ = _both(task, _data(), model=factory)

    _assert_same(seq, batched)
    assert not caplog.records


def test_gradient_with_dp_sgd_fails_each_client_like_sequential() -> None:
    task = dataclasses.replace(TASKS["dp_sgd"], kind=UpdateKind.GRADIENT)
    data = _data()
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())

    outcome = BatchedExecutor(trainer, data, seed=7).train_round(1, list(data.ids)[:3], task, params)

    assert not outcome.updates
    assert all("cannot be combined" in f.reason for f in outcome.failures)


def test_bad_options_are_errors() -> None:
    with pytest.raises(ValueError, match="max_batch_clients"):
        BatchedExecutor(_trainer(), _data(), seed=0, max_batch_clients=0)
    with pytest.raises(ValueError, match="min_batch_clients"):
        BatchedExecutor(_trainer(), _data(), seed=0, min_batch_clients=0)
    with pytest.raises(ValueError, match="memory_budget"):
        BatchedExecutor(_trainer(), _data(), seed=0, memory_budget=0)


@pytest.mark.parametrize("name", ["sgd", "momentum+weight_decay", "adam"])
def test_stacked_optimizer_steps_are_local_optimizers_bit_for_bit(name: str) -> None:
    """The batched engine's optimiser step on stacked rows is LocalOptimizer's
    on each client's own tensors, to the bit, also for the clients that stop
    early (only a prefix of the stack keeps stepping)."""
    task, k = TASKS[name], 3
    shapes = {"weight": (4, 5), "bias": (4,)}
    g = torch.Generator().manual_seed(0)
    start = {n: torch.randn(k, *s, generator=g) for n, s in shapes.items()}
    grads = [{n: torch.randn(k, *s, generator=g) for n, s in shapes.items()} for _ in range(5)]
    running = [3, 3, 2, 2, 1]
    stacked = {n: w.clone() for n, w in start.items()}
    step = stacked_optimizer(task, stacked, {n: torch.zeros(s) for n, s in shapes.items()})
    with torch.no_grad():
        for j, grad in zip(running, grads):
            step(j, {n: grad[n][:j] for n in shapes})

    for i in range(k):
        params = [nn.Parameter(start[n][i].clone()) for n in shapes]
        optimizer = LocalOptimizer(params, task)
        for j, grad in zip(running, grads):
            if i < j:
                for p, n in zip(params, shapes):
                    p.grad = grad[n][i].clone()
                optimizer.step()
        assert all(torch.equal(p.detach(), stacked[n][i]) for p, n in zip(params, shapes)), i
