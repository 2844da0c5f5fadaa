"""Shared fixtures: small configs that finish in a second or two."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from fedtrain import config
from fedtrain.config import Config


@pytest.fixture
def quick_config() -> Config:
    """The default digits setup cut to a few cheap rounds."""
    return config.load(None, ["run.rounds=3", "client.epochs=1", "strategy.clients_per_round=4"])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as ``simulate`` picks for small models (modules that
    compare engines bit for bit use it through ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's messages need a run id; one for the test, restored after."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
