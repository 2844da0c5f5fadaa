"""Reference models and user model factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtrain.config import BUILTIN_MODELS, ModelConfig
from fedtrain.models import build_model


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn", (64,)), ("cnn", (3, 32, 32)), ("mlp", (1, 28, 28))])
def test_reference_models_map_inputs_to_logits(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name, hidden=16), shape, 10, seed=0)

    assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_every_builtin_name_builds_a_module(name: str) -> None:
    language = name in ("gpt", "lstm")
    cfg = ModelConfig(name=name, hidden=16, embedding=16, lstm_hidden=16)
    model = build_model(cfg, (8,) if language else (64,), 10, seed=0)
    x = torch.randint(0, 10, (2, 8)) if language else torch.zeros(2, 64)

    assert model(x).shape == ((2, 8, 10) if language else (2, 10))


def test_initialisation_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()

    a = build_model(ModelConfig(), (64,), 10, seed=4)
    b = build_model(ModelConfig(), (64,), 10, seed=4)

    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_cnn_rejects_non_image_input() -> None:
    with pytest.raises(ValueError, match="model.name = 'cnn'"):
        build_model(ModelConfig(name="cnn"), (10,), 2, seed=0)


def test_user_factory_by_file_path(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def tiny(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n"
        "def not_a_model(input_shape, num_classes):\n"
        "    return 3\n"
    )

    model = build_model(ModelConfig(name=f"{tmp_path}/net.py:tiny"), (64,), 10, seed=0)

    assert sum(p.numel() for p in model.parameters()) == 650
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_model(ModelConfig(name=f"{tmp_path}/net.py:not_a_model"), (64,), 10, seed=0)
