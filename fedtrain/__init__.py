"""fedtrain: privacy-first federated training for PyTorch.

The public API that strategies, plug-ins and scripts are written against.
"""

from fedtrain.aggregation import example_weights, stack, weighted_mean
from fedtrain.arguments import (
    flag,
    fraction,
    integer,
    non_negative,
    positive,
    require_kind,
)
from fedtrain.config import Config, ConfigError
from fedtrain.layout import ParamLayout
from fedtrain.strategy import ServerOptimizer, Strategy, load_strategy
from fedtrain.types import (
    ClientUpdate,
    Evaluation,
    Params,
    RoundPlan,
    RoundRecord,
    UpdateKind,
)

__version__ = "0.1.0"

__all__ = [
    "ClientUpdate",
    "Config",
    "ConfigError",
    "Evaluation",
    "ParamLayout",
    "Params",
    "RoundPlan",
    "RoundRecord",
    "ServerOptimizer",
    "Strategy",
    "UpdateKind",
    "example_weights",
    "flag",
    "fraction",
    "integer",
    "load_strategy",
    "non_negative",
    "positive",
    "require_kind",
    "stack",
    "weighted_mean",
]
