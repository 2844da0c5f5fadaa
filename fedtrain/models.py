"""Small reference models, and any ``torch.nn.Module`` factory by name.

A model factory takes ``(input_shape, num_classes)`` and returns a module that
maps a batch of shape ``(B, *input_shape)`` to ``(B, num_classes)`` logits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fedtrain.config import ConfigError, ModelConfig
from fedtrain.plugin import load_object

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two-layer perceptron on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        c, h, w = input_shape
        return c, h, w
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return 1, side, side
    raise ConfigError(
        f"model.name = 'cnn' needs images (C, H, W) or square flat inputs; got input shape {input_shape}"
    )


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two 3×3 conv blocks and a linear head. GroupNorm rather than BatchNorm, so
    the model works with per-sample DP-SGD and needs no federated running stats."""
    c, h, w = _image_shape(input_shape)
    return nn.Sequential(
        nn.Unflatten(1, (c, h, w)) if len(input_shape) == 1 else nn.Identity(),
        nn.Conv2d(c, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2) if min(h, w) >= 4 else nn.Identity(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """The configured model, initialised from ``seed`` without touching the
    global torch RNG of the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "mlp":
            model = mlp(input_shape, num_classes, cfg.hidden)
        elif cfg.name == "cnn":
            model = cnn(input_shape, num_classes, cfg.hidden)
        else:
            factory = load_object(cfg.name, "model function", "model.name")
            model = factory(input_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name = {cfg.name!r}: the factory returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model
