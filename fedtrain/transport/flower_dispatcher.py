"""Asynchronous training over Flower: the deployment's
:class:`~fedtrain.training.dispatcher.Dispatcher`.

Each job is one ``train`` message to its client's node, pushed as soon as
the engine (:class:`~fedtrain.buffered.BufferedEngine`) submits it; replies
are pulled as they arrive, and each reply ends its job, in the order they
came. So a slow client holds nobody: the engine takes each update into its
buffer and sends new work to the idle client at once. A job without a reply
within ``client.timeout`` is its client's failure (recorded in the
aggregation it would have joined); the node is greeted again before it gets
more work, so a restarted client rejoins, as in a synchronous deployment.
A client that is not connected is sent nothing (:meth:`FlowerDispatcher.reachable`).

Replies are checked exactly as in a synchronous round
(:meth:`~fedtrain.transport.flower.FlowerTransport.decode`); the job's ``round`` in the task is the
version it starts from plus one, so a client's seeds follow the version as
in the simulation. Compression and secure aggregation are refused under
``run.mode = "async"`` (:func:`fedtrain.run.validate_run`), so each job
carries the full float32 model.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from flwr.app import ArrayRecord, Message, MessageType

from fedtrain.training.dispatcher import Finished, Job, JobOutcome
from fedtrain.transport.flower import FlowerTransport
from fedtrain.types import ClientFailure

if TYPE_CHECKING:
    import torch

    from fedtrain.training.train_task import TrainTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sent:
    job: Job
    node: int
    deadline: float
    task: TrainTask
    params: torch.Tensor


class FlowerDispatcher:
    """Jobs as Flower messages through ``transport``; completions in arrival order."""

    def __init__(self, transport: FlowerTransport) -> None:
        self.transport = transport
        self._started = time.monotonic()
        self._sent: dict[str, _Sent] = {}
        self._ended: deque[Finished] = deque()
        self._outcomes: dict[int, JobOutcome] = {}
        self._model: tuple[int, ArrayRecord] | None = None

    @property
    def now(self) -> float:
        return time.monotonic() - self._started

    def _end(self, job: Job, outcome: JobOutcome) -> None:
        self._outcomes[job.seq] = outcome
        self._ended.append(Finished(job, self.now))

    def _record(self, job: Job, params: torch.Tensor) -> ArrayRecord:
        """The model record of ``job``'s version, built once for every job of that version."""
        if self._model is None or self._model[0] != job.version:
            self._model = (job.version, self.transport.model_record(params))
        return self._model[1]

    def submit(self, job: Job, task: TrainTask, params: torch.Tensor) -> None:
        nodes, failures = self.transport.connected([job.client_id], task)
        if failures:
            self._end(job, failures[0])
            return
        node = nodes[job.client_id]
        rnd = job.version + 1
        own = self.transport.own_task(task, job.client_id)
        model = self.transport.model_for(job.client_id, rnd, params, self._record(job, params))
        message = Message(
            self.transport.train_content(rnd, own, model),
            dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.transport.timeout, group_id=str(rnd),
        )
        (message_id,) = self.transport.grid.push_messages([message])
        self._sent[message_id] = _Sent(job, node, time.monotonic() + self.transport.timeout, task, params)

    def peek_time(self) -> float | None:
        return None

    def reachable(self, clients: Sequence[str]) -> list[str]:
        """The connected ones (new and restarted nodes greeted first): a
        client that is gone gets no work until it rejoins, so it fills no
        slot of a buffer with a failure. With nothing in flight and nobody
        connected, waits up to ``client.timeout`` for a client to come back."""
        deadline = time.monotonic() + self.transport.timeout
        while True:
            found = self.transport.reachable(clients)
            if found or self._sent or self._ended or not clients or time.monotonic() >= deadline:
                return found
            time.sleep(self.transport.poll_seconds)

    def next_finished(self) -> Finished | None:
        while not self._ended:
            if not self._sent:
                return None
            for reply in self.transport.grid.pull_messages(list(self._sent)):
                sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
                if sent is None:
                    continue
                outcome = self.transport.decode(sent.job.client_id, reply, sent.task.kind, sent.params)
                if isinstance(outcome, ClientFailure):
                    self.transport.lost_(sent.job.client_id, sent.node)
                self._end(sent.job, outcome)
            clock = time.monotonic()
            for message_id, sent in [(m, s) for m, s in self._sent.items() if s.deadline <= clock]:
                del self._sent[message_id]
                self.transport.lost_(sent.job.client_id, sent.node)
                self._end(sent.job, ClientFailure(sent.job.client_id, f"no reply within {self.transport.timeout:g} s"))
            if not self._ended:
                time.sleep(self.transport.poll_seconds)
        return self._ended.popleft()

    def collect(self, jobs: Sequence[Job]) -> dict[int, JobOutcome]:
        return {job.seq: self._outcomes.pop(job.seq) for job in jobs}

    def discard_(self, job: Job) -> None:
        self._outcomes.pop(job.seq, None)

    def in_flight(self) -> tuple[Job, ...]:
        jobs = [s.job for s in self._sent.values()] + [f.job for f in self._ended]
        return tuple(sorted(jobs, key=lambda j: j.seq))

