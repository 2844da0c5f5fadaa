"""The round loop, and nothing else.

plan → train → validate → aggregate → evaluate → record. The engine does not
know how clients are reached (an :class:`~fedtrain.training.executor.Executor`
or a transport does that) nor what a
strategy computes; the same loop runs the in-process simulation and a
deployment.

When the executor streams and the strategy's aggregate is a weighted mean
(``needs_individual_updates = False``) or the privacy policy releases a sum
(user-level DP), each update is checked and folded in as it arrives
(:class:`RoundIntake`, :class:`~fedtrain.aggregation.UpdateFold`): coordinator
memory is then one buffer of rows, not one model per client, and the strategy
gets one :class:`~fedtrain.types.AggregateUpdate` (origin ``CLIENT_MEAN``)
standing for the folded clients, as under secure aggregation.

Under ``compression.up`` an update arrives as a
:class:`~fedtrain.compression.CompressedUpdate`; it is decoded before it is
checked, so the norm bound (user-level DP) holds for the decoded update.
Under ``compression.down`` clients train from the broadcast copy
(:class:`~fedtrain.compression.Downlink`), the coordinator aggregates into
its own model. Every record counts the bytes that crossed each way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from fedtrain.aggregation import FoldedClient, UpdateFold
from fedtrain.clock import VirtualClock
from fedtrain.compression import (
    CompressedUpdate, CompressionPlan, ModelSender, decoded_update, uncompressed_nbytes, wire_nbytes,
)
from fedtrain.training.executor import Executor, takes_sink
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig
from fedtrain.privacy.policy import BudgetExhausted, FoldingPolicy, NoPrivacy, PrivacyPolicy, PrivacyReport, Release
from fedtrain.sampling import Randomness, Sampler, SecretRandomness, SeededRandomness
from fedtrain.strategy import Strategy
from fedtrain.types import ClientFailure, ClientMetric, ClientUpdate, Evaluation, RoundPlan, RoundRecord, UpdateKind
from fedtrain.validation import inspect_update, split_valid

log = logging.getLogger(__name__)


class RoundObserver(Protocol):
    """Told about every finished round (results files, progress bars)."""

    def on_round(self, record: RoundRecord, params: torch.Tensor) -> None: ...


@runtime_checkable
class RunEndObserver(Protocol):
    """An observer that is also told when :meth:`Engine.run` returns, with
    the last round's record (None when no round ran) and model: after the
    last round, or when the privacy budget stops the run early (the
    checkpointer then saves a round that fell between its checkpoints)."""

    def on_run_end(self, record: RoundRecord | None, params: torch.Tensor) -> None: ...


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


def _decode(
    update: CompressedUpdate, numel: int, rnd: int, plan: CompressionPlan | None, out: torch.Tensor | None = None
) -> ClientUpdate | ClientFailure:
    """The plain update a compressed one stands for (decoded into ``out``
    when given), or its client's failure when the payload is refused."""
    try:
        return decoded_update(update, numel, rnd, plan, out=out)
    except ValueError as exc:
        return ClientFailure(update.client_id, f"compressed update refused: {exc}")


class RoundIntake:
    """The engine's :class:`~fedtrain.training.executor.UpdateSink` for one
    round: each update is checked as it enters (shape, dtype, kind, counts,
    metrics, finite: :func:`~fedtrain.validation.inspect_update`), admitted
    by the privacy policy (which sees the norm that check computed) and
    folded in; a refused one is kept as its client's failure, with the reason
    the unfolded round gives."""

    def __init__(
        self, fold: UpdateFold, policy: FoldingPolicy, kind: UpdateKind,
        rnd: int = 0, compression: CompressionPlan | None = None,
    ) -> None:
        self.fold = fold
        self.policy = policy
        self.kind = kind
        self.rnd = rnd
        self.compression = compression
        self.invalid: list[ClientFailure] = []
        self.refused: list[tuple[str, str]] = []
        self.validated = 0
        self.bytes_up = 0

    def row(self) -> torch.Tensor:
        return self.fold.row()

    def push(self, update: ClientUpdate) -> None:
        self._take(update, borrow=False)

    def take_returned(self, update: ClientUpdate) -> None:
        """Fold an update the executor returned (held by reference: the
        outcome keeps it alive anyway)."""
        self._take(update, borrow=True)

    def _take(self, update: ClientUpdate, borrow: bool) -> None:
        self.bytes_up += wire_nbytes(update, self.fold.numel)
        if isinstance(update, CompressedUpdate):
            decoded = _decode(update, self.fold.numel, self.rnd, self.compression, out=self.fold.row())
            if isinstance(decoded, ClientFailure):
                self.invalid.append(decoded)
                return
            update, borrow = decoded, False
        inspection = inspect_update(update, self.fold.numel, self.kind)
        if inspection.reason is not None:
            self.invalid.append(ClientFailure(update.client_id, inspection.reason))
            return
        self.validated += 1
        why = self.policy.admit(update, inspection.norm)
        if why is not None:
            self.refused.append((update.client_id, why))
            return
        self.fold.add_(update, borrow=borrow)


@dataclass(frozen=True)
class ConcludedRound:
    """A round's second half, done: the model after aggregation, its
    evaluation, who counted and who failed, and the privacy report."""

    params: torch.Tensor
    metrics: dict[str, float]
    contributors: int
    failures: list[ClientFailure]
    train_loss: float | None
    report: PrivacyReport

    def record(
        self, rnd: int, seconds: float, bytes_up: int, bytes_down: int, virtual_time: float | None,
        staleness: Mapping[str, int] = {}, staleness_weights: Mapping[str, float] = {},
    ) -> RoundRecord:
        """The round's :class:`~fedtrain.types.RoundRecord`."""
        return RoundRecord(
            round=rnd,
            metrics=dict(self.metrics),
            num_clients=self.contributors,
            num_failed=len(self.failures),
            train_loss=self.train_loss,
            seconds=seconds,
            epsilon=self.report.epsilon,
            delta=self.report.delta,
            privacy=dict(self.report.extra),
            failures={f.client_id: f.reason for f in self.failures},
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            virtual_time=virtual_time,
            staleness=dict(staleness),
            staleness_weights=dict(staleness_weights),
        )


def conclude_round(
    rnd: int,
    params: torch.Tensor,
    cohort: Sequence[str],
    failures: list[ClientFailure],
    checked: Sequence[ClientUpdate] | None,
    intake: RoundIntake | None,
    strategy: Strategy,
    privacy: PrivacyPolicy,
    journal: Callable[[int, Release], None] | None,
    evaluate: Callable[[torch.Tensor], Evaluation],
    min_clients: int,
) -> ConcludedRound:
    """Release, journal, aggregate and evaluate one round (or one
    asynchronous aggregation) of the updates that passed the checks:
    ``checked`` when they were returned, or those ``intake`` folded. The
    release's cost reaches ``journal`` before the model changes; a round
    with fewer than ``min_clients`` contributors leaves the model as it is.
    ``failures`` (the round's so far) is extended with the intake's invalid
    updates and the release's rejections."""
    if intake is None:
        release = privacy.release(rnd, cohort, checked or [])
    else:
        failures.extend(intake.invalid)
        release = intake.policy.release_fold(rnd, cohort, intake.fold, intake.validated)
        release = replace(release, rejected=(*intake.refused, *release.rejected))
    if journal is not None:
        journal(rnd, release)
    rejected = {cid for cid, _ in release.rejected}
    failures.extend(ClientFailure(cid, why) for cid, why in release.rejected)
    valid: Sequence[ClientUpdate | FoldedClient] = (
        [u for u in (checked or []) if u.client_id not in rejected] if intake is None
        else [c for c in intake.fold.clients if c.client_id not in rejected]
    )
    for failure in failures:
        log.warning("round %d: client %s rejected: %s", rnd, failure.client_id, failure.reason)
    contributors = sum(u.contributors for u in valid)
    if contributors >= min_clients and release.updates:
        params = strategy.aggregate(rnd, params, release.updates)
    else:
        log.warning(
            "round %d skipped: %d valid updates, strategy.min_clients = %d; model unchanged",
            rnd, contributors, min_clients,
        )
    evaluation = evaluate(params)
    losses = [u.metrics.get(ClientMetric.TRAIN_LOSS.value) for u in valid]
    train_loss = (
        float(np.average(losses, weights=[u.num_examples for u in valid]))
        if valid and all(isinstance(x, float) for x in losses) else None
    )
    return ConcludedRound(params, dict(evaluation.metrics), contributors, failures, train_loss, privacy.report())


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
    compression: CompressionPlan | None = None
    """``[compression]``: decodes compressed updates and keeps the
    downlink's broadcast copy; the executor holds the same plan's uplink."""
    clock: VirtualClock | None = None
    """A simulation's virtual clock (:mod:`fedtrain.clock`): a round lasts
    as long as its slowest sampled client, failed ones included (the round
    waits for every client it sent work to), and its record carries the
    time it ended. None (a deployment): no ``virtual_time``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model that a resumed run needs to continue
        exactly: strategy, privacy ledger and the random streams."""
        state: dict[str, Any] = {
            "strategy": self.strategy.state_dict(),
            "privacy": self.privacy.state_dict(),
            "rng": {
                "sampling": self.rngs.sampling.bit_generator.state,
                "strategy": self.rngs.strategy.bit_generator.state,
            },
        }
        if self.compression is not None:
            state["compression"] = self.compression.state_dict()
        if self.clock is not None:
            state["clock"] = self.clock.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.privacy.load_state_dict(state["privacy"])
        self.rngs.sampling.bit_generator.state = state["rng"]["sampling"]
        self.rngs.strategy.bit_generator.state = state["rng"]["strategy"]
        if self.compression is not None:
            self.compression.load_state_dict(state.get("compression", {}))
        if self.clock is not None:
            self.clock.load_state_dict(state.get("clock", {"now": 0.0}))

    def _intake(self, rnd: int, plan: RoundPlan, params: torch.Tensor) -> RoundIntake | None:
        """The round's sink, when the executor streams and the strategy and
        privacy policy allow a fold; None runs the round on the returned updates."""
        if params.numel() == 0 or not takes_sink(self.executor) or not isinstance(self.privacy, FoldingPolicy):
            return None
        reduction = self.privacy.reduction(self.strategy.needs_individual_updates, self.strategy.weighted)
        if reduction is None:
            return None
        fold = UpdateFold(reduction, params.numel(), plan.clients, plan.kind, params.device)
        return RoundIntake(fold, self.privacy, plan.kind, rnd, self.compression)

    def _decoded(
        self, rnd: int, updates: Sequence[ClientUpdate], numel: int
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """The returned updates with compressed ones decoded, and the refused ones."""
        decoded: list[ClientUpdate] = []
        refused: list[ClientFailure] = []
        for update in updates:
            if not isinstance(update, CompressedUpdate):
                decoded.append(update)
                continue
            plain = _decode(update, numel, rnd, self.compression)
            if isinstance(plain, ClientFailure):
                refused.append(plain)
            else:
                decoded.append(plain)
        return decoded, refused

    def _broadcast(self, rnd: int, params: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The model the clients train from, and the bytes each one received.
        An executor that sends each client its model itself (a deployment's
        transport, :class:`~fedtrain.compression.ModelSender`) gets the
        global model unchanged: under ``compression.down`` it compresses per
        client, against each client's own copy."""
        if isinstance(self.executor, ModelSender):
            return params, uncompressed_nbytes(params.numel())
        if self.compression is None or self.compression.downlink is None or params.numel() == 0:
            return params, uncompressed_nbytes(params.numel())
        return self.compression.downlink.broadcast_(rnd, params)

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
        intake = self._intake(rnd, plan, params)
        sent, down_each = self._broadcast(rnd, params)
        bytes_down = down_each * len(plan.clients)
        checked: list[ClientUpdate] | None = None
        if intake is None:
            outcome = self.executor.train_round(rnd, plan.clients, task, sent)
            bytes_up = sum(wire_nbytes(u, params.numel()) for u in outcome.updates)
            decoded, undecodable = self._decoded(rnd, outcome.updates, params.numel())
            checked, rejected_updates = split_valid(decoded, params.numel(), plan.kind)
            failures = [*outcome.failures, *undecodable, *rejected_updates]
        else:
            outcome = self.executor.train_round(rnd, plan.clients, task, sent, sink=intake)
            for update in outcome.updates:
                intake.take_returned(update)
            bytes_up = intake.bytes_up
            failures = list(outcome.failures)
        if isinstance(self.executor, ModelSender):
            bytes_down = self.executor.model_bytes
        done = conclude_round(
            rnd, params, plan.clients, failures, checked, intake,
            self.strategy, self.privacy, self.journal, self.evaluate, self.min_clients,
        )
        virtual_time = (
            None if self.clock is None else self.clock.advance_by_(self.clock.durations.slowest(plan.clients))
        )
        record = done.record(rnd, time.perf_counter() - started, bytes_up, bytes_down, virtual_time)
        return done.params, record

    def run(
        self,
        params: torch.Tensor,
        rounds: int,
        observers: Sequence[RoundObserver] = (),
        first_round: int = 1,
    ) -> tuple[torch.Tensor, list[RoundRecord], str | None]:
        """Up to ``rounds`` rounds; returns the last model, the records and why
        it stopped early (None when every round ran). On a privacy stop the
        model is the last one released within the budget, and the state
        (:meth:`state_dict`) that of the last round that ran: the stopped
        round's cohort draw is undone. Observers that are
        :class:`RunEndObserver` are told when it returns."""
        records: list[RoundRecord] = []
        stopped: str | None = None
        for rnd in range(first_round, first_round + rounds):
            sampling = self.rngs.sampling.bit_generator.state
            try:
                params, record = self.run_round(rnd, params)
            except BudgetExhausted as exc:
                log.warning("privacy budget exhausted, training stops: %s", exc)
                self.rngs.sampling.bit_generator.state = sampling
                stopped = str(exc)
                break
            records.append(record)
            for observer in observers:
                observer.on_round(record, params)
        for observer in observers:
            if isinstance(observer, RunEndObserver):
                observer.on_run_end(records[-1] if records else None, params)
        return params, records, stopped
