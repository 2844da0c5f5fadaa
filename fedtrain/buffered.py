"""Buffered asynchronous aggregation (FedBuff), and the dispatcher it drives.

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation" (AISTATS): the coordinator keeps ``async.concurrency`` clients
training at all times; each finished update joins a buffer with its
staleness ``s`` (how many model versions were released since its job
started); every ``async.buffer_size`` (``K``) updates the buffer becomes one
aggregation: each update scaled by its staleness weight ``w(s)``
(:func:`staleness_weight`), the strategy's mean and server step on them
(FedAvg's ``server_lr``, FedAdam / FedYogi / FedAdagrad's optimisers; a
strategy that needs each update, such as the median or Krum, gets each
scaled update), then new work for the idle slots. ``run.rounds`` counts
aggregations, and each one is one :class:`~fedtrain.types.RoundRecord`.

Which clients work: a client never has two jobs at once, and one whose job
finished since the last aggregation (taken into the buffer, dropped as too
stale, or failed) is not sent new work before the next aggregation, so it
contributes at most once to a buffer. Idle clients are drawn uniformly from
the engine's cohort randomness (:attr:`~fedtrain.engine.RngStreams.cohort`).
Completions at the same instant are all taken in before the freed slots are
refilled, so with ``K = concurrency = strategy.clients_per_round`` and equal
job lengths every aggregation has staleness 0 and is the synchronous round
of the same cohort.

Privacy (user level): each aggregation is one Gaussian release of the sum of
its at most ``K`` clipped (and staleness-scaled, ``w ≤ 1``) updates with
``N(0, (z·C)²)``, divided by ``K``. The dispatch order is no secret random
sample and a changed population changes who fills a slot (replace-one), so
no amplification is claimed: each release is accounted as fixed-size uniform
sampling is in a synchronous round, ``(z/2, q = 1)``
(:func:`fedtrain.privacy.user_level.round_event`). Sample level: each
client's ledger composes its DP-SGD job once per aggregation it finished
for, as in a synchronous round.

A :class:`~fedtrain.training.dispatcher.Dispatcher` carries the jobs to
clients: the simulation's on a virtual clock, a deployment's over Flower.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from fedtrain.aggregation import UpdateFold
from fedtrain.clock import VirtualClock
from fedtrain.compression import uncompressed_nbytes, wire_nbytes
from fedtrain.config import AsyncConfig, ClientConfig, Staleness
from fedtrain.engine import RngStreams, RoundIntake, RoundObserver, RunEndObserver, conclude_round
from fedtrain.privacy.policy import BudgetExhausted, FoldingPolicy, NoPrivacy, PrivacyPolicy, Release
from fedtrain.strategy import Strategy
from fedtrain.training.dispatcher import Dispatcher, Job
from fedtrain.training.train_task import TrainTask
from fedtrain.types import ClientFailure, ClientUpdate, Evaluation, RoundRecord, UpdateKind
from fedtrain.validation import split_valid

log = logging.getLogger(__name__)


def staleness_weight(staleness: int, settings: AsyncConfig) -> float:
    """``w(s)`` of ``async.staleness`` (Xie et al. 2019, "Asynchronous
    Federated Optimization", §5.2; FedBuff's default is the polynomial with
    ``a = ½``, ``1/√(1+s)``): ``(1+s)^-a``, 1, or the hinge ``1`` for
    ``s ≤ b`` and ``1 / (a (s − b) + 1)`` beyond. Always in (0, 1], so a
    scaled clipped update stays within the clip."""
    if staleness < 0:
        raise ValueError(f"staleness = {staleness}: must be >= 0")
    a = settings.staleness_exponent
    if settings.staleness is Staleness.CONSTANT:
        return 1.0
    if settings.staleness is Staleness.HINGE:
        b = settings.hinge_after
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    return float((1.0 + staleness) ** -a)


@dataclass
class BufferedEngine:
    """FedBuff over a :class:`Dispatcher`: the same public surface as
    :class:`~fedtrain.engine.Engine` (:meth:`run`, :meth:`state_dict`,
    :meth:`load_state_dict`, ``privacy``, ``journal``, ``evaluate``), so that
    :func:`fedtrain.run.run_engine` and the checkpointer drive it unchanged.
    A "round" is one aggregation."""

    strategy: Strategy
    dispatcher: Dispatcher
    evaluate: Callable[[torch.Tensor], Evaluation]
    clients: Sequence[str]
    client: ClientConfig
    min_clients: int
    rngs: RngStreams
    settings: AsyncConfig
    clock: VirtualClock | None = None
    """The simulation's virtual clock (the dispatcher's): checkpointed, and
    each record's ``virtual_time``. None (a transport): no virtual time."""
    privacy: PrivacyPolicy = field(default_factory=NoPrivacy)
    journal: Callable[[int, Release], None] | None = None
    """Told of each aggregation's release as soon as its privacy cost is
    composed, before the model changes (the run's ledger journal)."""
    version: int = 0
    _buffer: list[tuple[Job, int]] = field(default_factory=list, init=False)
    _dropped: list[ClientFailure] = field(default_factory=list, init=False)
    _finished: set[str] = field(default_factory=set, init=False)
    _dispatched: int = field(default=0, init=False)
    _seq: int = field(default=0, init=False)
    _restored: list[str] | None = field(default=None, init=False)
    _snapshot: dict[str, Any] | None = field(default=None, init=False)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The state as of the end of the last aggregation (or the start):
        strategy, privacy ledger, random streams, model version, virtual
        time and the jobs then in flight (client, start version, dispatch
        time). A resume re-dispatches those jobs from the restored model at
        the restored time: their work is lost, never counted twice."""
        return dict(self._snapshot) if self._snapshot is not None else self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.state_dict(),
            "privacy": self.privacy.state_dict(),
            "rng": {
                "sampling": self.rngs.sampling.bit_generator.state,
                "strategy": self.rngs.strategy.bit_generator.state,
            },
            "async": {
                "version": self.version,
                "clock": None if self.clock is None else self.clock.state_dict(),
                "seq": self._seq,
                "in_flight": [
                    {"client": j.client_id, "version": j.version, "dispatched_at": j.dispatched_at}
                    for j in self.dispatcher.in_flight()
                ],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.privacy.load_state_dict(state["privacy"])
        self.rngs.sampling.bit_generator.state = state["rng"]["sampling"]
        self.rngs.strategy.bit_generator.state = state["rng"]["strategy"]
        saved = state["async"]
        self.version = int(saved["version"])
        if self.clock is not None:
            self.clock.load_state_dict(saved["clock"])
        self._seq = int(saved["seq"])
        self._restored = [str(j["client"]) for j in saved["in_flight"]]
        self._snapshot = None

    # ------------------------------------------------------------ dispatch

    def _busy(self) -> set[str]:
        return {j.client_id for j in self.dispatcher.in_flight()} | self._finished

    def _send_(self, clients: Sequence[str], params: torch.Tensor) -> None:
        """Plan and send jobs from the current model to ``clients``."""
        if not clients:
            return
        rnd = self.version + 1
        plan = self.strategy.configure(rnd, clients, self.rngs.strategy)
        task = TrainTask.of(self.client, plan, self.privacy.client_privacy(rnd))
        for cid in plan.clients:
            self.dispatcher.submit(Job(self._seq, cid, self.version, self.dispatcher.now), task, params)
            self._seq += 1
            self._dispatched += 1

    def _refill_(self, params: torch.Tensor) -> bool:
        """Send work to idle clients until ``async.concurrency`` are busy;
        whether any job was sent."""
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self._send_([c for c in restored if c in set(self.clients)], params)
        busy = self._busy()
        free = self.settings.concurrency - len(self.dispatcher.in_flight())
        idle = self.dispatcher.reachable([c for c in self.clients if c not in busy])
        if free <= 0 or not idle:
            return False
        picked = self.rngs.cohort.choose(len(idle), min(free, len(idle)))
        before = self._dispatched
        self._send_([idle[i] for i in picked], params)
        return self._dispatched > before

    def _fill_buffer_(self, params: torch.Tensor) -> None:
        """Take completions until the buffer holds ``K`` updates (or no
        client is left to work: the buffer is then aggregated as it is)."""
        k = self.settings.buffer_size
        while len(self._buffer) < k:
            finished = self.dispatcher.next_finished()
            if finished is None:
                if not self._refill_(params):
                    return
                continue
            job = finished.job
            self._finished.add(job.client_id)
            staleness = self.version - job.version
            limit = self.settings.max_staleness
            if limit and staleness > limit:
                self.dispatcher.discard_(job)
                self._dropped.append(ClientFailure(
                    job.client_id,
                    f"update {staleness} model versions old exceeds async.max_staleness = {limit}",
                ))
            else:
                self._buffer.append((job, staleness))
            if len(self._buffer) < k and self.dispatcher.peek_time() != self.dispatcher.now:
                self._refill_(params)

    # ------------------------------------------------------------ aggregation

    def _weighted(self, update: ClientUpdate, weight: float) -> ClientUpdate:
        v = update.vector
        if weight == 1.0 or not isinstance(v, torch.Tensor) or v.dtype != torch.float32:
            return update
        return replace(update, vector=v * weight)

    def _intake(self, rnd: int, cohort: Sequence[str], kind: UpdateKind, params: torch.Tensor) -> RoundIntake | None:
        if params.numel() == 0 or not isinstance(self.privacy, FoldingPolicy):
            return None
        reduction = self.privacy.reduction(self.strategy.needs_individual_updates, self.strategy.weighted)
        if reduction is None:
            return None
        return RoundIntake(UpdateFold(reduction, params.numel(), cohort, kind, params.device), self.privacy, kind, rnd)

    def aggregate_(self, rnd: int, params: torch.Tensor, started: float) -> tuple[torch.Tensor, RoundRecord]:
        """Aggregation ``rnd`` of the buffer into the model; raises
        :class:`BudgetExhausted` before anything is released when it would
        exceed the privacy budget."""
        order = {cid: i for i, cid in enumerate(self.clients)}
        buffer = sorted(self._buffer, key=lambda item: order.get(item[0].client_id, len(order)))
        cohort = [j.client_id for j, _ in buffer] + [f.client_id for f in self._dropped]
        stop = self.privacy.check(rnd, cohort)
        if stop is not None:
            raise BudgetExhausted(stop)
        outcomes = self.dispatcher.collect([j for j, _ in buffer])
        numel = params.numel()
        failures: list[ClientFailure] = list(self._dropped)
        updates: list[ClientUpdate] = []
        staleness: dict[str, int] = {}
        weights: dict[str, float] = {}
        for job, s in buffer:
            outcome = outcomes[job.seq]
            if isinstance(outcome, ClientFailure):
                failures.append(outcome)
                continue
            w = staleness_weight(s, self.settings)
            staleness[job.client_id], weights[job.client_id] = s, w
            updates.append(self._weighted(outcome, w))
        kind = updates[0].kind if updates else UpdateKind.DELTA
        bytes_up = sum(wire_nbytes(u, numel) for u in updates)
        bytes_down = self._dispatched * uncompressed_nbytes(numel)
        intake = self._intake(rnd, [j.client_id for j, _ in buffer], kind, params)
        checked: list[ClientUpdate] | None = None
        if intake is None:
            checked, rejected_updates = split_valid(updates, numel, kind)
            failures.extend(rejected_updates)
        else:
            for update in updates:
                intake.push(update)
        done = conclude_round(
            rnd, params, cohort, failures, checked, intake,
            self.strategy, self.privacy, self.journal, self.evaluate, self.min_clients,
        )
        failed = {f.client_id for f in done.failures}
        record = done.record(
            rnd, time.perf_counter() - started, bytes_up, bytes_down,
            None if self.clock is None else self.clock.now,
            {c: s for c, s in staleness.items() if c not in failed},
            {c: w for c, w in weights.items() if c not in failed},
        )
        params = done.params
        self.version += 1
        self._buffer, self._dropped, self._finished, self._dispatched = [], [], set(), 0
        return params, record

    # ------------------------------------------------------------ the loop

    def run(
        self,
        params: torch.Tensor,
        rounds: int,
        observers: Sequence[RoundObserver] = (),
        first_round: int = 1,
    ) -> tuple[torch.Tensor, list[RoundRecord], str | None]:
        """Up to ``rounds`` aggregations; returns the last model, the records
        and why it stopped early (None when every aggregation ran). On a
        privacy stop the model is the last one released within the budget
        and :meth:`state_dict` that of the last aggregation."""
        records: list[RoundRecord] = []
        stopped: str | None = None
        self._refill_(params)
        if self._snapshot is None:
            self._snapshot = self._state()
        for rnd in range(first_round, first_round + rounds):
            started = time.perf_counter()
            self._fill_buffer_(params)
            if not self._buffer and not self._dropped:
                stopped = "no client is left to work: every job ended without an update to aggregate"
                log.warning("asynchronous training stops: %s", stopped)
                break
            try:
                params, record = self.aggregate_(rnd, params, started)
            except BudgetExhausted as exc:
                log.warning("privacy budget exhausted, training stops: %s", exc)
                stopped = str(exc)
                break
            if self.dispatcher.peek_time() != self.dispatcher.now:
                self._refill_(params)
            self._snapshot = self._state()
            records.append(record)
            for observer in observers:
                observer.on_round(record, params)
        for observer in observers:
            if isinstance(observer, RunEndObserver):
                observer.on_run_end(records[-1] if records else None, params)
        return params, records, stopped
