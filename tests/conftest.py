"""Shared fixtures: small configs that finish in a second or two."""

from __future__ import annotations

import pytest

from fedtrain import config
from fedtrain.config import Config


@pytest.fixture
def quick_config() -> Config:
    """The default digits setup cut to a few cheap rounds."""
    return config.load(None, ["run.rounds=3", "client.epochs=1", "strategy.clients_per_round=4"])
