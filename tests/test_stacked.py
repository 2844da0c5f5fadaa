"""StackedSequential: k parameter sets through one model give each set's own outputs."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from fedtrain.backends.stacked import StackedSequential
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
