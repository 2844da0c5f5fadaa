"""The clients' side of ``compression.up`` in a simulation: an executor
decorator that compresses each update as its client hands it over.

It wraps the training executors and the Byzantine attack (an attacker sends
its corrupted update through the same client software), and sits inside
secure aggregation. Each update is compressed after training and clipping,
with the client's error-feedback residual (:class:`fedtrain.compression.Uplink`),
and reaches the engine as a :class:`~fedtrain.compression.CompressedUpdate`
that the coordinator decodes at intake. Under secure aggregation (only
``randk`` is allowed there) the decoded sparse vector goes on to secure
aggregation, which masks its round's ``k`` kept values only
(:meth:`CompressingExecutor.secure_coordinates`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedtrain.compression import Uplink
from fedtrain.training.executor import Executor, MappedSink, UpdateSink, takes_sink
from fedtrain.training.train_task import TrainTask
from fedtrain.types import RoundOutcome


class CompressingExecutor:
    """Runs ``inner`` and compresses every update it produces.

    ``dense``: hand on the decoded vector instead of the payload (secure
    aggregation masks and sums whole vectors)."""

    def __init__(self, inner: Executor, uplink: Uplink, dense: bool = False) -> None:
        self.inner = inner
        self.uplink = uplink
        self.dense = dense

    def secure_coordinates(self, rnd: int, numel: int) -> torch.Tensor | None:
        """The coordinates secure aggregation sums in round ``rnd``: the
        round's ``randk`` ones when this executor hands on decoded vectors,
        else None (the whole vector)."""
        return self.uplink.secure_coordinates(rnd, numel) if self.dense else None

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        clip = task.privacy.clip
        if sink is not None and takes_sink(self.inner):
            return self.inner.train_round(rnd, clients, task, params, sink=MappedSink(
                sink, lambda u: self.uplink.compress_(rnd, u, clip, self.dense)
            ))
        outcome = self.inner.train_round(rnd, clients, task, params)
        updates = tuple(self.uplink.compress_(rnd, u, clip, self.dense) for u in outcome.updates)
        return RoundOutcome(updates, outcome.failures)
