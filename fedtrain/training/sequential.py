"""In-process simulation: every virtual client trains in this process, one
after another, on one shared model instance.

No Ray, no subprocess, no serialisation: a client's update is written straight
into the row the engine's fold hands out (:class:`~fedtrain.training.executor.UpdateSink`),
or, without a sink, into a row of one preallocated ``(cohort, P)`` buffer, so
the aggregation is a single ``w @ X`` over memory that is already warm.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from fedtrain.training.executor import UpdateSink
from fedtrain.training.trainer import LocalTrainer
from fedtrain.training.train_task import TrainTask
from fedtrain.data.clients import ClientData
from fedtrain.deadline import ClientTimeout, Deadline, call_with_timeout, timeout_reason
from fedtrain.types import ClientFailure, RoundOutcome
from fedtrain.types import ClientUpdate

log = logging.getLogger(__name__)


def client_generator(seed: int, rnd: int, client_index: int) -> torch.Generator:
    """The torch generator of one client in one round, derived from the run seed
    alone, so a client's randomness does not depend on who trained before it."""
    state = np.random.SeedSequence([seed, rnd, client_index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class SequentialExecutor:
    """Trains the planned clients of each round in process, one after another."""

    def __init__(self, trainer: LocalTrainer, data: ClientData, seed: int, timeout: float = 0.0) -> None:
        self.trainer = trainer
        self.data = data
        self.seed = seed
        self.timeout = timeout
        self.index = {cid: i for i, cid in enumerate(data.ids)}
        self._buffer = torch.empty(0)

    def _rows(self, n: int, numel: int) -> torch.Tensor:
        if self._buffer.shape[0] < n or self._buffer.shape[1:] != (numel,):
            self._buffer = torch.empty((n, numel), dtype=torch.float32, device=self.trainer.device)
        return self._buffer

    def _row(self, sink: UpdateSink | None, rows: torch.Tensor | None, index: int) -> torch.Tensor:
        if sink is not None:
            row = sink.row()
            if row.device == self.trainer.device:
                return row
            rows = self._rows(1, row.numel())
            index = 0
        if rows is None:
            raise ValueError("a round without a sink needs the executor's own rows")
        return rows[index]

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        """With a ``sink``, each update is trained straight into the sink's
        row and pushed (nothing is returned, and no ``(cohort, P)`` buffer is
        held); without one, into a row of this executor's buffer and returned."""
        params = params.to(self.trainer.device)
        rows = None if sink is not None else self._rows(len(clients), params.numel())
        updates: list[ClientUpdate] = []
        failures: list[ClientFailure] = []
        for cid in clients:
            if cid not in self.index:
                failures.append(ClientFailure(cid, "unknown client id"))
                continue
            refusal = task.privacy.refusal(cid)
            if refusal is not None:
                failures.append(ClientFailure(cid, refusal))
                continue
            out = self._row(sink, rows, len(updates))
            deadline = Deadline(self.timeout)
            try:
                x, y = call_with_timeout(lambda: self.data.load(cid), self.timeout)
                own = replace(task, privacy=task.privacy.for_client(cid))
                result = self.trainer.train(params, x, y, own, client_generator(self.seed, rnd, self.index[cid]), out)
                deadline.check()
            except ClientTimeout:
                failures.append(ClientFailure(cid, timeout_reason(self.timeout)))
                continue
            except Exception as exc:  # a failing client must not end the round
                log.debug("round %d: client %s failed", rnd, cid, exc_info=True)
                failures.append(ClientFailure(cid, f"{type(exc).__name__}: {exc}"))
                continue
            update = ClientUpdate(
                client_id=cid,
                vector=out,
                num_examples=result.num_examples,
                kind=task.kind,
                metrics=result.metrics,
            )
            if sink is None:
                updates.append(update)
            else:
                sink.push(update)
        return RoundOutcome(tuple(updates), tuple(failures))
