"""What carries an asynchronous run's jobs to clients: the :class:`Dispatcher`
protocol that :class:`~fedtrain.buffered.BufferedEngine` drives, and the
simulation's :class:`VirtualClockDispatcher`.

A job is one client's local work from one model version; a dispatcher sends
it at once and tells which job ends first. In a simulation completions are
ordered on a virtual clock (:mod:`fedtrain.clock`) and training is lazy; a
transport (:class:`fedtrain.transport.flower.FlowerDispatcher`) carries jobs
over the network and orders completions by their arrival.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch

from fedtrain.clock import VirtualClock
from fedtrain.training.executor import Executor
from fedtrain.training.train_task import TrainTask
from fedtrain.types import ClientFailure, ClientUpdate


@dataclass(frozen=True)
class Job:
    """One client's local work: from model ``version`` (0 = the initial
    model), sent at ``dispatched_at`` (seconds since the run started);
    ``seq`` numbers the run's jobs in dispatch order."""

    seq: int
    client_id: str
    version: int
    dispatched_at: float


@dataclass(frozen=True)
class Finished:
    """A job that ended at ``time`` (its outcome is collected separately)."""

    job: Job
    time: float


JobOutcome = ClientUpdate | ClientFailure


class Dispatcher(Protocol):
    """Carries jobs to clients and tells when they end.

    The engine :meth:`submit` s each job with the model it starts from (a
    tensor the engine never modifies afterwards), takes the earliest ending
    job with :meth:`next_finished`, asks for the outcomes of the finished
    jobs it aggregates with :meth:`collect` and forgets those it drops with
    :meth:`discard_`. :attr:`now` is the dispatcher's time in seconds since
    the run started: virtual in a simulation, elapsed in a deployment.
    """

    @property
    def now(self) -> float: ...

    def submit(self, job: Job, task: TrainTask, params: torch.Tensor) -> None: ...

    def peek_time(self) -> float | None:
        """When the next job ends, if known (None: nothing in flight, or not known yet)."""
        ...

    def next_finished(self) -> Finished | None:
        """The job that ends first (blocking until one does); None when nothing is in flight."""
        ...

    def collect(self, jobs: Sequence[Job]) -> dict[int, JobOutcome]:
        """Each finished job's update or failure, by :attr:`Job.seq`."""
        ...

    def discard_(self, job: Job) -> None:
        """Forget a finished job whose outcome the engine will not use."""
        ...

    def in_flight(self) -> tuple[Job, ...]:
        """The jobs submitted and not yet returned by :meth:`next_finished`, in dispatch order."""
        ...

    def reachable(self, clients: Sequence[str]) -> list[str]:
        """Those of ``clients`` that can be sent work now, in their order
        (a deployment's connected clients; every client in a simulation)."""
        ...


@dataclass
class _Pending:
    job: Job
    task: TrainTask
    outcome: JobOutcome | None = None


class VirtualClockDispatcher:
    """The simulation's :class:`Dispatcher`: any in-process
    :class:`~fedtrain.training.executor.Executor`, with completions ordered
    on a :class:`~fedtrain.clock.VirtualClock` (a job ends its client's
    duration after it was sent; ties in dispatch order).

    Training is lazy and batched: when the engine collects outcomes, every
    job not yet trained — finished or still in flight — is trained, one
    ``executor.train_round(version + 1, clients, task, params)`` per model
    version (and task) it started from, so that a batched executor still
    batches the clients that start from the same model, and the per-client
    seeds follow the version. Only the models still referenced by untrained
    jobs are kept."""

    def __init__(self, executor: Executor, clock: VirtualClock) -> None:
        self.executor = executor
        self.clock = clock
        self._queue: list[tuple[float, int, Job]] = []
        self._pending: dict[int, _Pending] = {}
        self._models: dict[int, torch.Tensor] = {}
        self.trainings = 0
        """``train_round`` calls made (how well the lazy training batches)."""

    @property
    def now(self) -> float:
        return self.clock.now

    def submit(self, job: Job, task: TrainTask, params: torch.Tensor) -> None:
        if job.seq in self._pending:
            raise ValueError(f"job {job.seq} was submitted already")
        self._models.setdefault(job.version, params)
        self._pending[job.seq] = _Pending(job, task)
        ends = job.dispatched_at + self.clock.durations.of_client(job.client_id)
        heapq.heappush(self._queue, (ends, job.seq, job))

    def peek_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def next_finished(self) -> Finished | None:
        if not self._queue:
            return None
        ends, _, job = heapq.heappop(self._queue)
        return Finished(job, self.clock.advance_to_(ends))

    def in_flight(self) -> tuple[Job, ...]:
        return tuple(job for _, _, job in sorted(self._queue, key=lambda item: item[1]))

    def reachable(self, clients: Sequence[str]) -> list[str]:
        return list(clients)

    def discard_(self, job: Job) -> None:
        self._pending.pop(job.seq, None)
        self._forget_models_()

    def collect(self, jobs: Sequence[Job]) -> dict[int, JobOutcome]:
        self._train_pending_()
        outcomes: dict[int, JobOutcome] = {}
        for job in jobs:
            pending = self._pending.pop(job.seq)
            if pending.outcome is None:
                raise RuntimeError(f"job {job.seq} of client {job.client_id} has no outcome after training")
            outcomes[job.seq] = pending.outcome
        return outcomes

    def _train_pending_(self) -> None:
        groups: list[tuple[int, TrainTask, list[_Pending]]] = []
        for pending in self._pending.values():
            if pending.outcome is not None:
                continue
            for version, task, members in groups:
                if version == pending.job.version and task == pending.task:
                    members.append(pending)
                    break
            else:
                groups.append((pending.job.version, pending.task, [pending]))
        for version, task, members in groups:
            clients = [p.job.client_id for p in members]
            outcome = self.executor.train_round(version + 1, clients, task, self._models[version])
            self.trainings += 1
            updates = {u.client_id: u for u in outcome.updates}
            failures = {f.client_id: f for f in outcome.failures}
            for p in members:
                cid = p.job.client_id
                if cid in updates:
                    u = updates[cid]
                    held = isinstance(u.vector, torch.Tensor)
                    p.outcome = replace(u, vector=u.vector.detach().clone()) if held else u
                else:
                    p.outcome = failures.get(cid, ClientFailure(cid, "the executor returned no update"))
        self._forget_models_()

    def _forget_models_(self) -> None:
        needed = {p.job.version for p in self._pending.values() if p.outcome is None}
        for version in [v for v in self._models if v not in needed]:
            del self._models[version]
