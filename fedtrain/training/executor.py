"""The executor interface: what carries a round's task to the clients and
their updates back, in process (sequential, batched) or over a transport."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from fedtrain.training.train_task import TrainTask
from fedtrain.types import RoundOutcome


class Executor(Protocol):
    """Carries a round's task to the clients and their updates back.

    Update vectors may live in a buffer that the executor reuses next round;
    they are valid until the next call.
    """

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome: ...
