"""The executor interface: what carries a round's task to the clients and
their updates back, in process (sequential, batched) or over a transport."""

from __future__ import annotations

import inspect
from typing import Callable, Protocol, Sequence

import torch

from fedtrain.training.train_task import TrainTask
from fedtrain.types import ClientUpdate, RoundOutcome

SINK_PARAMETER = "sink"
"""The name of :meth:`Executor.train_round`'s optional sink parameter."""


class UpdateSink(Protocol):
    """Where an executor that streams puts each update as soon as it has it,
    instead of holding the cohort's updates until the round ends: the engine
    checks each one and folds it into a running sum
    (:class:`fedtrain.aggregation.UpdateFold`), so coordinator memory does not
    grow with the cohort."""

    def row(self) -> torch.Tensor:
        """A ``(P,)`` float32 row to write the next update into, so that
        :meth:`push` need not copy it; the same row until an update is pushed."""
        ...

    def push(self, update: ClientUpdate) -> None:
        """Hand over one client's update: its vector is the last :meth:`row`
        or any other tensor, which is copied (the caller may reuse it after
        the call). A refused update becomes the client's failure in the
        round's record; the executor does not report it again."""
        ...


class MappedSink:
    """A sink that passes each update through ``transform`` on its way into
    ``sink``: how an executor decorator (an attack, compression) acts on the
    updates of the executor it wraps without holding them."""

    def __init__(self, sink: UpdateSink, transform: Callable[[ClientUpdate], ClientUpdate]) -> None:
        self.sink = sink
        self.transform = transform

    def row(self) -> torch.Tensor:
        return self.sink.row()

    def push(self, update: ClientUpdate) -> None:
        self.sink.push(self.transform(update))


class Executor(Protocol):
    """Carries a round's task to the clients and their updates back.

    With a ``sink``, an executor may push updates into it as they come in
    rather than return them; whatever it returns in
    :attr:`RoundOutcome.updates` is taken in after the call as well, so an
    executor that never streams ignores the sink. An executor whose
    ``train_round`` has no ``sink`` parameter (the four-argument form of
    earlier releases) is never given one (:func:`takes_sink`).

    Update vectors may live in a buffer that the executor reuses next round;
    they are valid until the next call.
    """

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome: ...


def takes_sink(executor: object) -> bool:
    """Whether ``executor.train_round`` accepts a ``sink`` (decorators ask
    this of the executor they wrap)."""
    method = getattr(executor, "train_round", None)
    if method is None:
        return False
    try:
        return SINK_PARAMETER in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
