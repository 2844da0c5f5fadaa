"""Local training's precision (bf16 autocast) and gradient accumulation: the
defaults are today's computation bit for bit; bf16 stays close to fp32 with
float32 weights, state and update; k micro-batches make one step on k·batch."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from torch import nn

from fedtrain import ParamLayout, UpdateKind, config
from fedtrain.aggregation import stack
from fedtrain.config import ConfigError, GradSampleMode, Optimizer, Precision
from fedtrain.models import cnn, mlp
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.training.batched import BatchedExecutor
from fedtrain.training.sequential import SequentialExecutor
from fedtrain.training.task import Classification
from fedtrain.training.train_task import TrainTask, precision_context
from fedtrain.training.trainer import LocalTrainer
from fedtrain.data.clients import PartitionedData
from fedtrain.types import RoundPlan

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer() -> LocalTrainer:
    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=32)
    return LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU)


def _records(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _update(trainer: LocalTrainer, task: TrainTask, x: torch.Tensor, y: torch.Tensor, seed: int = 5
            ) -> tuple[torch.Tensor, dict[str, float]]:
    params = trainer.layout.flatten(trainer.model.state_dict())
    out = torch.empty_like(params)
    result = trainer.train(params, x, y, task, torch.Generator().manual_seed(seed), out)
    trainer.load_(params)
    return out, result.metrics


# ------------------------------------------------------------------ the task


def test_the_task_carries_precision_and_accumulation_from_the_client_config() -> None:
    cfg = config.load(None, ["client.precision=bf16", "client.grad_accum_steps=3"])
    task = TrainTask.of(cfg.client, RoundPlan(clients=()), ClientPrivacy())

    assert task.precision is Precision.BF16 and task.grad_accum_steps == 3
    assert TrainTask.from_json(json.loads(json.dumps(task.as_json()))) == task
    old = task.as_json()
    del old["precision"], old["grad_accum_steps"]  # a task from a coordinator without these keys
    assert TrainTask.from_json(old) == dataclasses.replace(task, precision=Precision.FP32, grad_accum_steps=1)
    with pytest.raises(ValueError, match="client.grad_accum_steps = 0"):
        TrainTask(epochs=1, batch_size=8, lr=0.1, grad_accum_steps=0)


def test_bf16_autocasts_the_forward_pass_and_fp32_leaves_it_alone() -> None:
    layer = nn.Linear(8, 4)
    x = torch.rand(3, 8)
    with precision_context(Precision.BF16, CPU):
        assert layer(x).dtype == torch.bfloat16
    with precision_context(Precision.FP32, CPU):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


# ------------------------------------------------------------- fp32 default


def test_the_default_task_is_the_reference_loop_bit_for_bit() -> None:
    """Today's local SGD written out with ``torch.optim.SGD``: a randperm per
    epoch, batches of ``batch_size``, the mean loss, one step each."""
    trainer = _trainer()
    x, y = _records(100)
    task = TrainTask(epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    got, _ = _update(trainer, task, x, y, seed=5)

    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=32)
    start = ParamLayout.of(model.state_dict()).flatten(model.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(100, generator=g)
        for s in range(0, 100, 16):
            idx = order[s:s + 16]
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            sgd.step()
    want = ParamLayout.of(model.state_dict()).flatten(model.state_dict()) - start

    assert torch.equal(got, want)


# --------------------------------------------------------------------- bf16


@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAM])
def test_bf16_training_is_close_to_fp32_with_float32_weights_state_and_update(optimizer: Optimizer) -> None:
    x, y = _records(96)
    fp32 = TrainTask(epochs=2, batch_size=16, lr=0.05 if optimizer is Optimizer.SGD else 0.003,
                     momentum=0.9 if optimizer is Optimizer.SGD else 0.0, optimizer=optimizer)
    bf16 = dataclasses.replace(fp32, precision=Precision.BF16)
    trainer = _trainer()
    want, want_metrics = _update(trainer, fp32, x, y)
    got, got_metrics = _update(trainer, bf16, x, y)
    (optimizer,) = {id(o): o for o in trainer._optimizers.values()}.values()
    state = [t for s in optimizer.state.values() for t in s.values() if t.is_floating_point()]
    grads = [p.grad for p in trainer.model.parameters()]
    other_order, _ = _update(trainer, fp32, x, y, seed=6)

    assert got.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert state and all(t.dtype == torch.float32 for t in state)  # momentum buffer / Adam moments
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert not torch.equal(got, want)  # the forward pass really ran in bfloat16
    assert float((got - want).norm() / want.norm()) < 0.1
    assert float((got - want).norm()) < 0.25 * float((other_order - want).norm())  # far below another batch order
    assert got_metrics["train_loss"] == pytest.approx(want_metrics["train_loss"], rel=0.02)


def test_bf16_trains_a_conv_net_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 10, hidden=8)
    trainer = LocalTrainer(model, ParamLayout.of(model.state_dict()), CPU)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    task = TrainTask(epochs=1, batch_size=10, lr=0.1)

    want, _ = _update(trainer, task, x, y)
    got, _ = _update(trainer, dataclasses.replace(task, precision=Precision.BF16), x, y)

    assert not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 0.05


def test_bf16_fedsgd_gradient_is_close_to_fp32_and_float32() -> None:
    x, y = _records(50)
    task = TrainTask(epochs=1, batch_size=16, lr=0.1, kind=UpdateKind.GRADIENT)
    trainer = _trainer()
    want, _ = _update(trainer, task, x, y)
    got, _ = _update(trainer, dataclasses.replace(task, precision=Precision.BF16), x, y)

    assert got.dtype == torch.float32
    assert not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 0.03


def test_evaluation_stays_fp32_after_bf16_training() -> None:
    x, y = _records(64)
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())
    before = trainer.evaluate(params, x, y).metrics
    _update(trainer, TrainTask(epochs=1, batch_size=16, lr=0.1, precision=Precision.BF16), x, y)

    assert trainer.evaluate(params, x, y).metrics == before
    with torch.no_grad():
        loss = nn.functional.cross_entropy(trainer.model(x), y, reduction="sum").double() / len(y)
    assert before["loss"] == pytest.approx(float(loss), rel=1e-6)


# ------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("momentum, mu", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.1)])
def test_k_micro_batches_make_one_step_on_the_k_times_larger_batch(momentum: float, mu: float) -> None:
    x, y = _records(100)  # 100 = 3 logical batches of 32 and one of 4: a ragged last step
    big = TrainTask(epochs=2, batch_size=32, lr=0.1, momentum=momentum, proximal_mu=mu)
    accumulated = dataclasses.replace(big, batch_size=8, grad_accum_steps=4)
    small = dataclasses.replace(big, batch_size=8)
    trainer = _trainer()

    want, want_metrics = _update(trainer, big, x, y)
    got, got_metrics = _update(trainer, accumulated, x, y)
    plain, _ = _update(trainer, small, x, y)

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, want, rtol=1e-3, atol=1e-4)  # without accumulation: 4x the steps
    assert got_metrics["train_loss"] == pytest.approx(want_metrics["train_loss"], rel=1e-5)


def test_an_uneven_last_micro_batch_is_weighted_by_its_records() -> None:
    x, y = _records(30)  # one logical batch of 30 = micro-batches of 12, 12, 6
    trainer = _trainer()
    want, _ = _update(trainer, TrainTask(epochs=1, batch_size=30, lr=0.2), x, y)
    got, _ = _update(trainer, TrainTask(epochs=1, batch_size=12, lr=0.2, grad_accum_steps=3), x, y)

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulation_with_bf16_stays_close_to_the_big_fp32_batch() -> None:
    x, y = _records(64)
    trainer = _trainer()
    want, _ = _update(trainer, TrainTask(epochs=1, batch_size=32, lr=0.1), x, y)
    got, _ = _update(trainer, TrainTask(epochs=1, batch_size=8, lr=0.1, grad_accum_steps=4,
                                        precision=Precision.BF16), x, y)

    assert float((got - want).norm() / want.norm()) < 0.05


# ------------------------------------------------------------------ DP-SGD


@pytest.mark.parametrize("override", ["client.precision=bf16", "client.grad_accum_steps=2"])
def test_sample_level_dp_refuses_bf16_and_accumulation(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*privacy.mode = 'sample'"):
        config.load(None, ["privacy.mode=sample", "privacy.noise_multiplier=1.0", override])
    user = config.load(None, ["privacy.mode=user", "privacy.noise_multiplier=1.0", override])
    assert user.client.precision is Precision.BF16 or user.client.grad_accum_steps == 2


def test_the_trainer_refuses_a_dp_sgd_task_in_bf16() -> None:
    dp = DpSgdTask(noise_multiplier=1.0, max_grad_norm=1.0, mode=GradSampleMode.HOOKS, secure_noise=False)
    task = TrainTask(epochs=1, batch_size=8, lr=0.1, privacy=ClientPrivacy(dp_sgd=dp), precision=Precision.BF16)
    x, y = _records(16)
    with pytest.raises(ValueError, match="client.precision = 'bf16'.*fp32"):
        _update(_trainer(), task, x, y)


# ------------------------------------------------------------ batched engine


def _data() -> PartitionedData:
    x, y = _records(120)
    parts = {str(c): torch.arange(c * 20, (c + 1) * 20).numpy() for c in range(6)}
    return PartitionedData(x, y, parts, CPU)


@pytest.mark.parametrize("changes", [{"precision": Precision.BF16}, {"grad_accum_steps": 2}])
def test_auto_batched_falls_back_to_sequential_with_a_reason(
    caplog: pytest.LogCaptureFixture, changes: dict[str, object]
) -> None:
    data = _data()
    task = dataclasses.replace(TrainTask(epochs=1, batch_size=5, lr=0.1), **changes)  # type: ignore[arg-type]
    seq_trainer, batched_trainer = _trainer(), _trainer()
    params = seq_trainer.layout.flatten(seq_trainer.model.state_dict())
    want = SequentialExecutor(seq_trainer, data, seed=7).train_round(1, list(data.ids), task, params)
    backend = BatchedExecutor(batched_trainer, data, seed=7)
    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        got = stack(backend.train_round(1, list(data.ids), task, params).updates).clone()
        again = backend.train_round(2, list(data.ids), task, params)

    name = next(iter(changes))
    assert [r.getMessage() for r in caplog.records if f"client.{name}" in r.getMessage()] != []
    assert len(caplog.records) == 1  # logged once, not every round
    assert torch.equal(got, stack(want.updates))
    assert len(again.updates) == len(data.ids)

    strict = BatchedExecutor(_trainer(), data, seed=7, strict=True)
    with pytest.raises(ValueError, match=f"client.{name}"):
        strict.train_round(1, list(data.ids), task, params)


def test_fedsgd_with_accumulation_still_batches(caplog: pytest.LogCaptureFixture) -> None:
    data = _data()
    task = TrainTask(epochs=1, batch_size=5, lr=0.1, kind=UpdateKind.GRADIENT, grad_accum_steps=3)
    trainer = _trainer()
    params = trainer.layout.flatten(trainer.model.state_dict())
    with caplog.at_level(logging.WARNING, logger="fedtrain.training.batched"):
        got = BatchedExecutor(trainer, data, seed=7, strict=True).train_round(1, list(data.ids), task, params)

    assert not caplog.records
    assert len(got.updates) == len(data.ids)


def test_classification_mean_loss_is_what_the_reference_loop_uses() -> None:
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(Classification().mean_loss(out, y), nn.functional.cross_entropy(out, y))
