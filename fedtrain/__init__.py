"""fedtrain: privacy-first federated training for PyTorch.

The public API that strategies, tasks, plug-ins and scripts are written against.
Names are imported on first use (PEP 562), so that processes which need only
a light corner of the package (the deployed client's per-message relay) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ClientUpdate": "fedtrain.types",
    "Config": "fedtrain.config",
    "ConfigError": "fedtrain.config",
    "Evaluation": "fedtrain.types",
    "ParamLayout": "fedtrain.layout",
    "Params": "fedtrain.types",
    "RoundPlan": "fedtrain.types",
    "RoundRecord": "fedtrain.types",
    "ServerOptimizer": "fedtrain.strategy",
    "Strategy": "fedtrain.strategy",
    "Task": "fedtrain.training.task",
    "UpdateKind": "fedtrain.types",
    "example_weights": "fedtrain.aggregation",
    "flag": "fedtrain.arguments",
    "fraction": "fedtrain.arguments",
    "integer": "fedtrain.arguments",
    "load_strategy": "fedtrain.strategy",
    "non_negative": "fedtrain.arguments",
    "positive": "fedtrain.arguments",
    "require_kind": "fedtrain.arguments",
    "stack": "fedtrain.aggregation",
    "weighted_mean": "fedtrain.aggregation",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fedtrain.aggregation import example_weights, stack, weighted_mean
    from fedtrain.arguments import flag, fraction, integer, non_negative, positive, require_kind
    from fedtrain.config import Config, ConfigError
    from fedtrain.layout import ParamLayout
    from fedtrain.strategy import ServerOptimizer, Strategy, load_strategy
    from fedtrain.training.task import Task
    from fedtrain.types import ClientUpdate, Evaluation, Params, RoundPlan, RoundRecord, UpdateKind


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
