"""Simulated Byzantine clients: a decorator of any executor that corrupts the
updates of a fixed, seeded subset of clients.

An experiment option (``attack.kind``, ``attack.fraction``), not a code
change, so robust strategies can be compared against FedAvg on the same
attack (Blanchard et al. 2017; Yin et al. 2018).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedtrain.training.train_task import TrainTask
from fedtrain.config import AttackKind
from fedtrain.training.executor import Executor
from fedtrain.types import RoundOutcome


def choose_attackers(clients: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction · N)`` clients drawn once per run from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAD]))
    count = int(round(fraction * len(clients)))
    return frozenset(clients[i] for i in rng.choice(len(clients), size=count, replace=False))


class AttackingExecutor:
    """Runs ``inner`` and then rewrites the attackers' update vectors in place."""

    def __init__(self, inner: Executor, attackers: frozenset[str], kind: AttackKind, scale: float, seed: int) -> None:
        self.inner = inner
        self.attackers = attackers
        self.kind = kind
        self.scale = scale
        self.seed = seed

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        outcome = self.inner.train_round(rnd, clients, task, params)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        for update in outcome.updates:
            if update.client_id not in self.attackers:
                continue
            v = update.vector
            if self.kind is AttackKind.SIGN_FLIP:
                v.mul_(-self.scale)
            elif self.kind is AttackKind.SCALE:
                v.mul_(self.scale)
            elif self.kind is AttackKind.NOISE:
                v.copy_(torch.randn(v.shape, generator=generator) * self.scale)
        return outcome
