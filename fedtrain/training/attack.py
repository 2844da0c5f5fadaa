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
from fedtrain.training.executor import Executor, MappedSink, UpdateSink, takes_sink
from fedtrain.types import ClientUpdate, RoundOutcome


def choose_attackers(clients: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction · N)`` clients drawn once per run from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAD]))
    count = int(round(fraction * len(clients)))
    return frozenset(clients[i] for i in rng.choice(len(clients), size=count, replace=False))


class AttackingExecutor:
    """Runs ``inner`` and rewrites the attackers' update vectors in place.

    With a sink, sign flips and scalings are applied to each attacker's
    update on its way into the sink (:class:`~fedtrain.training.executor.MappedSink`), so the inner
    executor streams as it would without an attack. The ``noise`` attack
    draws its noise from one generator in cohort order, which a stream in
    another order (the batched engine's chunks) would hand to other clients:
    it runs the inner executor without a sink and returns the updates.
    """

    def __init__(self, inner: Executor, attackers: frozenset[str], kind: AttackKind, scale: float, seed: int) -> None:
        self.inner = inner
        self.attackers = attackers
        self.kind = kind
        self.scale = scale
        self.seed = seed

    def _corrupted(self, update: ClientUpdate, generator: torch.Generator) -> ClientUpdate:
        self.corrupt_(update, generator)
        return update

    def corrupt_(self, update: ClientUpdate, generator: torch.Generator) -> None:
        """Rewrite ``update``'s vector in place when its client is an attacker."""
        if update.client_id not in self.attackers:
            return
        v = update.vector
        if self.kind is AttackKind.SIGN_FLIP:
            v.mul_(-self.scale)
        elif self.kind is AttackKind.SCALE:
            v.mul_(self.scale)
        elif self.kind is AttackKind.NOISE:
            v.copy_(torch.randn(v.shape, generator=generator) * self.scale)

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        if sink is not None and self.kind is not AttackKind.NOISE and takes_sink(self.inner):
            return self.inner.train_round(rnd, clients, task, params, sink=MappedSink(sink, lambda u: self._corrupted(u, generator)))
        outcome = self.inner.train_round(rnd, clients, task, params)
        for update in outcome.updates:
            self.corrupt_(update, generator)
        return outcome
