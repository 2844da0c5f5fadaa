"""The round loop, and nothing else.

plan → train → validate → aggregate → evaluate → record. The engine does not
know how clients are reached (an :class:`~fedtrain.training.executor.Executor`
or a transport does that) nor what a
strategy computes; the same loop runs the in-process simulation and a
deployment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from fedtrain.training.executor import Executor
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig
from fedtrain.privacy.policy import BudgetExhausted, NoPrivacy, PrivacyPolicy, Release
from fedtrain.sampling import Randomness, Sampler, SecretRandomness, SeededRandomness
from fedtrain.strategy import Strategy
from fedtrain.types import ClientFailure, ClientMetric, Evaluation, RoundRecord
from fedtrain.validation import split_valid

log = logging.getLogger(__name__)


class RoundObserver(Protocol):
    """Told about every finished round (results files, progress bars)."""

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class RngStreams:
    """Independent random streams of one run, derived from ``run.seed``, and
    where the cohort comes from.

    ``secret`` (set under DP with secure noise, see
    :func:`fedtrain.sampling.secret_sampling`) replaces ``sampling`` for the
    cohort: amplification by sampling needs a sample the published seed
    cannot replay. It has no state; ``sampling`` is still checkpointed, so a
    resumed run restores what a seeded run needs and nothing else changes.
    """

    sampling: np.random.Generator
    strategy: np.random.Generator
    secret: Randomness | None = None

    @property
    def cohort(self) -> Randomness:
        """The randomness each round's cohort is drawn from."""
        return self.secret if self.secret is not None else SeededRandomness(self.sampling)

    @classmethod
    def from_seed(cls, seed: int, secret_cohort: bool = False) -> "RngStreams":
        """The run's streams; with ``secret_cohort`` the cohort comes from a CSPRNG."""
        sampling, strategy = np.random.SeedSequence(seed).spawn(2)
        return cls(
            np.random.default_rng(sampling),
            np.random.default_rng(strategy),
            SecretRandomness() if secret_cohort else None,
        )


@dataclass
class Engine:
    """Runs federated rounds: the same loop for every executor and transport."""

    strategy: Strategy
    executor: Executor
    sampler: Sampler
    evaluate: Callable[[torch.Tensor], Evaluation]
    clients: Sequence[str]
    client: ClientConfig
    min_clients: int
    rngs: RngStreams
    privacy: PrivacyPolicy = field(default_factory=NoPrivacy)
    journal: Callable[[int, Release], None] | None = None
    """Told of each round's release as soon as its privacy cost is composed,
    before the model is aggregated or anything about the round is published:
    the run's ledger journal (:class:`fedtrain.checkpoint.LedgerJournal`)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model that a resumed run needs to continue
        exactly: strategy, privacy ledger and the random streams."""
        return {
            "strategy": self.strategy.state_dict(),
            "privacy": self.privacy.state_dict(),
            "rng": {
                "sampling": self.rngs.sampling.bit_generator.state,
                "strategy": self.rngs.strategy.bit_generator.state,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.privacy.load_state_dict(state["privacy"])
        self.rngs.sampling.bit_generator.state = state["rng"]["sampling"]
        self.rngs.strategy.bit_generator.state = state["rng"]["strategy"]

    def run_round(self, rnd: int, params: torch.Tensor) -> tuple[torch.Tensor, RoundRecord]:
        """One round; raises :class:`BudgetExhausted` before any client works
        when the round would exceed the privacy budget."""
        started = time.perf_counter()
        cohort = self.sampler.sample(self.clients, self.rngs.cohort)
        stop = self.privacy.check(rnd, cohort)
        if stop is not None:
            raise BudgetExhausted(stop)
        plan = self.strategy.configure(rnd, cohort, self.rngs.strategy)
        task = TrainTask.of(self.client, plan, self.privacy.client_privacy(rnd))
        outcome = self.executor.train_round(rnd, plan.clients, task, params)
        valid, rejected_updates = split_valid(outcome.updates, params.numel(), plan.kind)
        failures = [*outcome.failures, *rejected_updates]
        release = self.privacy.release(rnd, plan.clients, valid)
        if self.journal is not None:
            self.journal(rnd, release)
        rejected = {cid for cid, _ in release.rejected}
        failures.extend(ClientFailure(cid, why) for cid, why in release.rejected)
        valid = [u for u in valid if u.client_id not in rejected]
        for failure in failures:
            log.warning("round %d: client %s rejected: %s", rnd, failure.client_id, failure.reason)
        contributors = sum(u.contributors for u in valid)
        if contributors >= self.min_clients and release.updates:
            params = self.strategy.aggregate(rnd, params, release.updates)
        else:
            log.warning(
                "round %d skipped: %d valid updates, strategy.min_clients = %d; model unchanged",
                rnd, contributors, self.min_clients,
            )
        evaluation = self.evaluate(params)
        losses = [u.metrics.get(ClientMetric.TRAIN_LOSS.value) for u in valid]
        train_loss = (
            float(np.average(losses, weights=[u.num_examples for u in valid]))
            if valid and all(isinstance(x, float) for x in losses) else None
        )
        report = self.privacy.report()
        record = RoundRecord(
            round=rnd,
            metrics=dict(evaluation.metrics),
            num_clients=contributors,
            num_failed=len(failures),
            train_loss=train_loss,
            seconds=time.perf_counter() - started,
            epsilon=report.epsilon,
            delta=report.delta,
            privacy=dict(report.extra),
            failures={f.client_id: f.reason for f in failures},
        )
        return params, record

    def run(
        self,
        params: torch.Tensor,
        rounds: int,
        observers: Sequence[RoundObserver] = (),
        first_round: int = 1,
    ) -> tuple[torch.Tensor, list[RoundRecord], str | None]:
        """Up to ``rounds`` rounds; returns the last model, the records and why
        it stopped early (None when every round ran). On a privacy stop the
        model is the last one released within the budget."""
        records: list[RoundRecord] = []
        for rnd in range(first_round, first_round + rounds):
            try:
                params, record = self.run_round(rnd, params)
            except BudgetExhausted as exc:
                log.warning("privacy budget exhausted, training stops: %s", exc)
                return params, records, str(exc)
            records.append(record)
            for observer in observers:
                observer.on_round(record, params)
        return params, records, None
