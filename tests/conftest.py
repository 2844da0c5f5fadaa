"""Shared fixtures: small configs that finish in a second or two, and the
real deployments that start in the background as the session begins
(:mod:`deployed`)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

import deployed
from fedtrain import config
from fedtrain.config import Config


def _background_names(item: pytest.Item) -> list[str]:
    module = getattr(item, "module", None)
    return [] if module is None else [module.__name__, f"{module.__name__}::{getattr(item, 'name', '')}"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of a background deployment (:func:`deployed.in_background`)
    run last, in their order: the other tests run while the deployments do,
    rather than after a test that waits for one."""
    waiting = [item for item in items if any(map(deployed.is_background, _background_names(item)))]
    if waiting:
        ids = {id(item) for item in waiting}
        items[:] = [item for item in items if id(item) not in ids] + waiting


@pytest.fixture(scope="session", autouse=True)
def deployments_in_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Start, before the first test, every background deployment
    (:func:`deployed.in_background`) of the collected test modules, so that
    they overlap with each other and with the CPU-bound tests; wait for them
    all at the end of the session."""
    names = [name for item in request.session.items for name in _background_names(item)]
    deployed.start_background_(names, tmp_path_factory.mktemp)
    yield
    deployed.finish_background_()


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
