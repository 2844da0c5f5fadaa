"""StackedSequential: k parameter sets through one model give each set's own outputs."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from fedtrain.training.task import Classification
from fedtrain.training.stacked import StackedSequential
from fedtrain.models import cnn, mlp


def _stacked_params(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    names = [n for n, _ in models[0].named_parameters()]
    return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}


@pytest.mark.parametrize(
    "factory",
    [
        lambda: mlp((64,), 10, hidden=16),
        lambda: cnn((64,), 10, hidden=16),
        lambda: nn.Sequential(nn.Unflatten(1, (4, 16)), nn.Linear(16, 8, bias=False), nn.GELU(), nn.Flatten(),
                              nn.Sequential(nn.Linear(32, 10), nn.Tanh())),
    ],
    ids=["mlp", "cnn", "nested-3d-linear"],
)
def test_each_parameter_set_gives_its_own_model_output(factory: Callable[[], nn.Module]) -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(factory())
    stacked = StackedSequential.of(models[0])
    assert stacked is not None
    x = torch.rand(3, 5, 64, generator=torch.Generator().manual_seed(9))
    got = stacked(_stacked_params(models), x)
    expected = torch.stack([m(x[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)),
        nn.Sequential(nn.Flatten(0), nn.Linear(4, 4)),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
        nn.Linear(4, 4),
    ],
    ids=["batchnorm", "layernorm", "dropout", "flatten-batch-dim", "reflect-padding", "not-sequential"],
)
def test_layers_without_a_stacked_form_are_refused(model: nn.Module) -> None:
    assert StackedSequential.of(model) is None


def _objective_gradients(
    stacked: StackedSequential, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Autograd's gradients of ``sum(w · loss)`` through the stacked forward pass, with the
    training layer's loss: the written-out backward must agree with it."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ce = Classification().per_record_loss(stacked(leaves, x).transpose(1, 2), y)
    grads = torch.autograd.grad((ce * w).sum(), list(leaves.values()))
    return dict(zip(leaves, grads)), ce.detach()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: mlp((64,), 10, hidden=16),
        lambda: nn.Sequential(nn.Unflatten(1, (4, 16)), nn.Linear(16, 8, bias=False), nn.GELU(), nn.Flatten(),
                              nn.Sequential(nn.Linear(32, 10), nn.Tanh())),
        lambda: nn.Sequential(nn.Linear(64, 12), nn.LeakyReLU(0.2), nn.Linear(12, 12), nn.Sigmoid(),
                              nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 10), nn.Identity()),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(inplace=True), nn.Linear(12, 10)),
        lambda: nn.Sequential(nn.Linear(64, 10)),
    ],
    ids=["mlp", "nested-3d-linear", "activations", "inplace-relu", "logistic"],
)
def test_written_out_gradients_equal_autograd(factory: Callable[[], nn.Module]) -> None:
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        models.append(factory())
    stacked = StackedSequential.of(models[0])
    assert stacked is not None and stacked.differentiable
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, 64, generator=g), torch.randint(0, 10, (4, 6), generator=g)
    w = torch.rand(4, 6, generator=g) * (torch.rand(4, 6, generator=g) > 0.3)  # padded records weigh 0
    params = _stacked_params(models)

    got, losses = stacked.gradients(params, x, y, w)
    expected, expected_losses = _objective_gradients(stacked, params, x, y, w)

    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses, expected_losses)


@pytest.mark.parametrize(
    "model",
    [cnn((64,), 10, hidden=16), nn.Sequential(nn.Linear(4, 4), nn.ELU()), nn.Sequential(nn.Linear(4, 4), nn.SiLU(True))],
    ids=["cnn", "elu", "inplace-silu"],
)
def test_layers_without_a_written_out_backward_keep_autograd(model: nn.Module) -> None:
    stacked = StackedSequential.of(model)
    assert stacked is not None and not stacked.differentiable

    with pytest.raises(ValueError, match="no written-out backward"):
        stacked.gradients({}, torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
