"""The strategy interface, the server optimiser wrapper, and loading by name.

A strategy decides what the sampled clients do in a round (:meth:`configure`)
and how their updates become the next global model (:meth:`aggregate`). It
sees flat ``float32`` vectors (see :mod:`fedtrain.layout`) and never learns
which executor or transport carries the messages. Built-ins live in the top-level
``strategies`` package, written only against this public API, so each one is
also an example of a plug-in.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fedtrain.plugin import PluginError, load_object
from fedtrain.types import ClientUpdate, RoundPlan


class Strategy:
    """Base class of every aggregation strategy; subclass and override
    :meth:`aggregate` (and :meth:`configure` to change what clients do).

    ``needs_individual_updates`` (default true) says that the strategy may
    look at each update on its own (median, Krum, a plug-in's own rule): it
    gets every update of the round, held at once, and cannot run on a
    securely aggregated sum or under user-level DP. A strategy whose
    ``aggregate`` depends on the updates only through their mean (weighted
    by ``num_examples`` when ``weighted``) sets it to false, as the
    averaging built-ins do; it then gets one
    :class:`~fedtrain.types.AggregateUpdate` standing for the round's
    clients — their mean, summed ``num_examples`` and ``contributors`` —
    folded as updates arrive (origin ``CLIENT_MEAN``: the coordinator's
    memory does not grow with the cohort) or made by secure aggregation
    (``SECURE_SUM``). ``weighted`` says whether the strategy averages updates
    by their record counts; secure aggregation then sums each client's
    update with its (capped) count as weight, and with 1 when it is false.
    """

    needs_individual_updates: bool = True
    weighted: bool = True

    def configure(
        self, rnd: int, clients: Sequence[str], rng: np.random.Generator
    ) -> RoundPlan:
        """The plan for the sampled ``clients`` of round ``rnd``: by default all
        of them train locally and send their model delta."""
        return RoundPlan(clients=tuple(clients))

    def aggregate(
        self, rnd: int, params: torch.Tensor, updates: Sequence[ClientUpdate]
    ) -> torch.Tensor:
        """The new global parameters from the current ones and the round's
        valid updates (never empty). Must not modify ``params`` in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate()")

    def state_dict(self) -> dict[str, Any]:
        """State that a checkpoint must keep (e.g. server optimiser moments)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state but was given keys {sorted(state)}"
            )


OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class ServerOptimizer:
    """A ``torch.optim`` optimiser applied to the global model on the server.

    The round's aggregated delta ``Δ`` is turned into the pseudo-gradient
    ``-Δ`` and handed to the optimiser (Reddi et al. 2021, "Adaptive
    Federated Optimization"): SGD with lr 1 is FedAvg, SGD with momentum is
    FedAvgM, Adam / Adagrad / Yogi are FedAdam / FedAdagrad / FedYogi.
    """

    def __init__(self, factory: OptimizerFactory) -> None:
        self._factory = factory
        self._param: torch.nn.Parameter | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: Mapping[str, Any] | None = None

    def _ensure(self, params: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        if self._param is None or self._optimizer is None or self._param.shape != params.shape:
            self._param = torch.nn.Parameter(params.detach().clone())
            self._optimizer = self._factory([self._param])
            if self._pending_state is not None:
                self._optimizer.load_state_dict(copy.deepcopy(dict(self._pending_state)))
                self._pending_state = None
        else:
            with torch.no_grad():
                self._param.copy_(params)
        return self._param, self._optimizer

    def step(self, params: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """New parameters after one optimiser step on pseudo-gradient ``-delta``."""
        param, optimizer = self._ensure(params)
        param.grad = -delta.detach().to(param.dtype)
        optimizer.step()
        param.grad = None
        return param.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy) of the optimiser state: torch's own shares
        the live moment tensors, which would keep changing after the call."""
        if self._optimizer is None:
            return copy.deepcopy(dict(self._pending_state or {}))
        return copy.deepcopy(self._optimizer.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._optimizer is None:
            self._pending_state = copy.deepcopy(dict(state)) if state else None
        else:
            self._optimizer.load_state_dict(copy.deepcopy(dict(state)))


BUILTIN_STRATEGIES: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedprox": "strategies.fedprox:FedProx",
    "fedavgm": "strategies.fedavgm:FedAvgM",
    "fedadam": "strategies.fedadam:FedAdam",
    "fedyogi": "strategies.fedyogi:FedYogi",
    "fedadagrad": "strategies.fedadagrad:FedAdagrad",
    "fedmedian": "strategies.fedmedian:FedMedian",
    "trimmed_mean": "strategies.trimmed_mean:TrimmedMean",
    "krum": "strategies.krum:Krum",
    "multi_krum": "strategies.krum:MultiKrum",
    "fedsgd": "strategies.fedsgd:FedSGD",
}


def check_options(target: Callable[..., Any], options: Mapping[str, Any], key: str) -> None:
    """Raise if ``options`` names a keyword that ``target`` does not accept."""
    signature = inspect.signature(target)
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for name, value in options.items():
        if name not in allowed:
            raise PluginError(
                f"{key}.{name} = {value!r}: unknown option; "
                f"{getattr(target, '__name__', target)} accepts {allowed or 'no options'}"
            )


def load_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """A strategy from a built-in name or a ``module:Class`` / ``file.py:Class``
    spec, constructed with ``options`` as keyword arguments."""
    options = dict(options or {})
    spec = BUILTIN_STRATEGIES.get(name.lower(), name)
    if ":" not in spec:
        raise PluginError(
            f"strategy.name = {name!r}: not a built-in; built-ins are "
            f"{sorted(BUILTIN_STRATEGIES)}, or give 'package.module:Class' / 'file.py:Class'"
        )
    cls = load_object(spec, "strategy class", "strategy.name", kind=Strategy)
    if not callable(cls):
        raise PluginError(f"strategy.name = {name!r}: {spec} is not a class")
    check_options(cls, options, "strategy.options")
    try:
        strategy = cls(**options)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"strategy {name!r} with options {options}: {exc}") from exc
    missing = [m for m in ("configure", "aggregate", "state_dict", "load_state_dict")
               if not callable(getattr(strategy, m, None))]
    if missing:
        raise PluginError(
            f"strategy.name = {name!r}: {type(strategy).__name__} lacks {missing}; "
            "subclass fedtrain.Strategy"
        )
    return strategy
