"""LocalTrainer: the update is local − global, gradients are exact, FedProx pulls back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedtrain import ParamLayout, UpdateKind
from fedtrain.training.optimizer import LocalOptimizer
from fedtrain.training.trainer import LocalTrainer, clip_and_report_, resolve_device
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ConfigError, GradSampleMode, Optimizer
from fedtrain.models import mlp
from fedtrain.privacy.dpsgd import DpSgdTask
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.types import ClientMetric


def _setup() -> tuple[LocalTrainer, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp((5,), 3, hidden=8)
    layout = ParamLayout.of(model.state_dict())
    trainer = LocalTrainer(model, layout, torch.device("cpu"))
    x = torch.randn(40, 5)
    y = torch.randint(0, 3, (40,))
    return trainer, layout.flatten(model.state_dict()), x, y


def _task(**changes: object) -> TrainTask:
    base = dict(epochs=2, batch_size=8, lr=0.1)
    base.update(changes)
    return TrainTask(**base)  # type: ignore[arg-type]


def test_delta_is_local_minus_global() -> None:
    trainer, params, x, y = _setup()
    out = torch.empty_like(params)

    result = trainer.train(params, x, y, _task(), torch.Generator().manual_seed(1), out)
    local = trainer.layout.flatten(trainer.model.state_dict())

    assert result.num_examples == 40
    assert torch.allclose(out, local - params)
    assert out.abs().sum() > 0


def test_same_generator_seed_gives_identical_updates() -> None:
    trainer, params, x, y = _setup()
    a, b = torch.empty_like(params), torch.empty_like(params)

    trainer.train(params, x, y, _task(), torch.Generator().manual_seed(5), a)
    trainer.train(params, x, y, _task(), torch.Generator().manual_seed(5), b)

    assert torch.equal(a, b)


def test_gradient_kind_returns_the_full_batch_mean_gradient() -> None:
    trainer, params, x, y = _setup()
    out = torch.empty_like(params)
    reference = mlp((5,), 3, hidden=8)
    reference.load_state_dict(trainer.layout.unflatten(params), strict=False)
    F.cross_entropy(reference(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])

    trainer.train(params, x, y, _task(kind=UpdateKind.GRADIENT, batch_size=7), torch.Generator(), out)

    assert torch.allclose(out, expected, atol=1e-6)


def test_proximal_term_keeps_the_local_model_closer() -> None:
    trainer, params, x, y = _setup()
    free, prox = torch.empty_like(params), torch.empty_like(params)

    trainer.train(params, x, y, _task(epochs=5), torch.Generator().manual_seed(2), free)
    trainer.train(params, x, y, _task(epochs=5, proximal_mu=10.0), torch.Generator().manual_seed(2), prox)

    assert prox.norm() < 0.8 * free.norm()


def test_empty_client_is_an_error() -> None:
    trainer, params, x, y = _setup()

    with pytest.raises(ValueError, match="no training records"):
        trainer.train(params, x[:0], y[:0], _task(), torch.Generator(), torch.empty_like(params))


def test_evaluate_counts_correct_predictions() -> None:
    trainer, params, x, y = _setup()

    evaluation = trainer.evaluate(params, x, y, batch_size=16)
    with torch.no_grad():
        expected = (trainer.model(x).argmax(1) == y).float().mean().item()

    assert evaluation.num_examples == 40
    assert evaluation.accuracy == pytest.approx(expected)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="client.device = 'cuda:0'.*no CUDA"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("privacy", [
    "none",
    "user",
    "sample",
    "distributed",
])
def test_train_task_survives_json(privacy: str) -> None:
    """A deployed client gets its task as JSON: every field, privacy included, comes back."""
    import json

    from fedtrain.config import GradSampleMode, Optimizer
    from fedtrain.privacy.dpsgd import DpSgdTask
    from fedtrain.privacy.policy import ClientPrivacy

    settings = {
        "none": ClientPrivacy(),
        "user": ClientPrivacy(clip=0.7),
        "sample": ClientPrivacy(dp_sgd=DpSgdTask(1.3, 0.2, GradSampleMode.EW, secure_noise=False)),
        "distributed": ClientPrivacy(clip=0.5, distributed_noise=0.9),
    }
    task = TrainTask(2, 16, 0.05, 0.9, 1e-4, Optimizer.ADAM, 0.01, UpdateKind.GRADIENT, settings[privacy])

    assert TrainTask.from_json(json.loads(json.dumps(task.as_json()))) == task


def test_malformed_train_task_names_what_is_missing() -> None:
    row = TrainTask(1, 8, 0.1).as_json()
    del row["lr"]

    with pytest.raises(ValueError, match="lr"):
        TrainTask.from_json(row)


def _steps(task: TrainTask, ours: bool) -> list[torch.Tensor]:
    """Parameters after two clients' worth of steps (state reset between them),
    with a frozen parameter that gets no gradient."""
    torch.manual_seed(0)
    model = mlp((5,), 3, hidden=8)
    next(model.parameters()).requires_grad_(False)
    params = list(model.parameters())
    if ours:
        optimizer = LocalOptimizer(params, task)
    elif task.optimizer is Optimizer.ADAM:
        optimizer = torch.optim.Adam(params, lr=task.lr, weight_decay=task.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    for _ in range(2):
        optimizer.reset() if ours else optimizer.state.clear()
        for start in range(0, 48, 8):
            optimizer.zero_grad()
            F.cross_entropy(model(x[start:start + 8]), y[start:start + 8]).backward()
            optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"momentum": 0.9, "weight_decay": 0.01},
        {"optimizer": Optimizer.ADAM, "lr": 0.01},
        {"optimizer": Optimizer.ADAM, "lr": 0.01, "weight_decay": 0.05},
    ],
)
def test_local_optimizer_is_bit_identical_to_torch_optim(changes: dict[str, object]) -> None:
    task = _task(**changes)

    ours, torchs = _steps(task, ours=True), _steps(task, ours=False)

    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))


def test_clip_and_report_clips_rows_in_place_and_reports_only_the_clipped_bit() -> None:
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])

    metrics = clip_and_report_(updates, [1.0, 2.0, 3.0], _task(privacy=ClientPrivacy(clip=1.0)))

    assert metrics == [{ClientMetric.UNCLIPPED.value: 0.0}, {ClientMetric.UNCLIPPED.value: 1.0},
                       {ClientMetric.UNCLIPPED.value: 1.0}]
    torch.testing.assert_close(updates, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_clip_and_report_reports_the_loss_only_without_privacy() -> None:
    dp_sgd = ClientPrivacy(dp_sgd=DpSgdTask(1.0, 1.0, GradSampleMode.HOOKS, secure_noise=False))
    vector = torch.tensor([3.0, 4.0])

    assert clip_and_report_(vector, [0.25], _task()) == [{ClientMetric.TRAIN_LOSS.value: 0.25}]
    assert clip_and_report_(vector, [0.25], _task(privacy=dp_sgd)) == [{}]
    assert torch.equal(vector, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="2 training losses for 1 updates"):
        clip_and_report_(vector, [0.25, 0.5], _task())
