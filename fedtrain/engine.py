"""The round loop, and nothing else.

plan → train → validate → aggregate → evaluate → record. The engine does not
know how clients are reached (a :class:`Backend` does that) nor what a
strategy computes; the same loop runs the in-process simulation and a
deployment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from fedtrain.sampling import UniformSampler
from fedtrain.strategy import Strategy
from fedtrain.types import ClientUpdate, Evaluation, RoundPlan, RoundRecord
from fedtrain.validation import rejection_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientFailure:
    """A client that produced no usable update this round, and why."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class RoundOutcome:
    """What a backend brings back from one round of client work."""

    updates: tuple[ClientUpdate, ...]
    failures: tuple[ClientFailure, ...]


class Backend(Protocol):
    """Carries a round's plan to the clients and their updates back.

    Update vectors may live in a buffer that the backend reuses next round;
    they are valid until the next call.
    """

    def train_round(self, rnd: int, plan: RoundPlan, params: torch.Tensor) -> RoundOutcome: ...


class RoundObserver(Protocol):
    """Told about every finished round (results files, progress bars)."""

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class RngStreams:
    """Independent random streams of one run, all derived from ``run.seed``."""

    sampling: np.random.Generator
    strategy: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> "RngStreams":
        sampling, strategy = np.random.SeedSequence(seed).spawn(2)
        return cls(np.random.default_rng(sampling), np.random.default_rng(strategy))


@dataclass
class Engine:
    """Runs ``rounds`` federated rounds from ``params``."""

    strategy: Strategy
    backend: Backend
    sampler: UniformSampler
    evaluate: Callable[[torch.Tensor], Evaluation]
    clients: Sequence[str]
    min_clients: int
    rngs: RngStreams

    def run_round(self, rnd: int, params: torch.Tensor) -> tuple[torch.Tensor, RoundRecord]:
        started = time.perf_counter()
        cohort = self.sampler.sample(self.clients, self.rngs.sampling)
        plan = self.strategy.configure(rnd, cohort, self.rngs.strategy)
        outcome = self.backend.train_round(rnd, plan, params)
        failures = list(outcome.failures)
        valid: list[ClientUpdate] = []
        for update in outcome.updates:
            reason = rejection_reason(update, params.numel(), plan.kind)
            if reason is None:
                valid.append(update)
            else:
                failures.append(ClientFailure(update.client_id, reason))
        for failure in failures:
            log.warning("round %d: client %s rejected: %s", rnd, failure.client_id, failure.reason)
        if len(valid) >= self.min_clients:
            params = self.strategy.aggregate(rnd, params, valid)
        else:
            log.warning(
                "round %d skipped: %d valid updates, strategy.min_clients = %d; model unchanged",
                rnd, len(valid), self.min_clients,
            )
        evaluation = self.evaluate(params)
        weights = [u.num_examples for u in valid]
        losses = [u.metrics.get("train_loss") for u in valid]
        train_loss = (
            float(np.average(losses, weights=weights))
            if valid and all(isinstance(x, float) for x in losses) else None
        )
        record = RoundRecord(
            round=rnd,
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            num_clients=len(valid),
            num_failed=len(failures),
            train_loss=train_loss,
            seconds=time.perf_counter() - started,
        )
        return params, record

    def run(
        self,
        params: torch.Tensor,
        rounds: int,
        observers: Sequence[RoundObserver] = (),
        first_round: int = 1,
    ) -> tuple[torch.Tensor, list[RoundRecord]]:
        records: list[RoundRecord] = []
        for rnd in range(first_round, first_round + rounds):
            params, record = self.run_round(rnd, params)
            records.append(record)
            for observer in observers:
                observer.on_round(record, params)
        return params, records
