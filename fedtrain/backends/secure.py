"""Secure aggregation in simulation: a backend that wraps the training backend
and hands the engine only the sum.

The inner backend plays the clients' local training; this wrapper then plays
both sides of one SecAgg+ round (:mod:`fedtrain.secure.protocol`) in this
process: one :class:`SecureClient` per client that trained, one
:class:`SecureServer`, the stage messages handed from one to the other as a
network would carry them. A deployment carries the same messages over
Flower's Message API; nothing here is specific to simulation but the
transport and the simulated dropouts.

What the engine and the strategy see: one :class:`ClientUpdate` per round,
``client_id = "secure-aggregate"``, whose vector is the weighted mean
``Σ w_i Δ_i / Σ w_i`` of the survivors, ``num_examples = Σ w_i`` and
``contributors`` the number of survivors. Weights are
``min(num_examples, secure.max_weight)``, or 1 when the strategy averages
unweighted (its ``weighted`` attribute is false) or under distributed DP;
they are summed inside the masked vector (its last element), so the
coordinator learns only their total. Per-client metrics (training loss) are
not reported: the coordinator must not see per-client values.

Each client checks its own update before masking (shape, dtype, finite
values, positive record count: :func:`fedtrain.validation.rejection_reason`),
since the coordinator can no longer. A client that fails, sends a malformed
message or drops is excluded and reported as a :class:`ClientFailure`; when
too few remain to unmask, the round aborts, every participant is reported
failed with the reason, and the engine skips the round (model unchanged).

A malicious client can still write any ring element into its masked input.
The coordinator refuses a sum no honest cohort could produce (a summed
weight outside ``[m, m · max_weight]`` for ``m`` survivors, or a coordinate
beyond ``clip_range · Σ w / max_weight``) and aborts the round the same way;
within those bounds one client can move the released mean anywhere within
``±clip_range`` per coordinate, which is the limit of what a sum without
range proofs can guarantee (see :mod:`fedtrain.secure.protocol`). Record
counts never reach floating point here: a weight is the integer
``min(num_examples, max_weight)``, and the summed weight the coordinator
divides by is bounded as above.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from fedtrain.client import TrainTask
from fedtrain.engine import Backend, ClientFailure, RoundOutcome
from fedtrain.privacy.noise import NoiseSource, noise_source
from fedtrain.secure.messages import AggregateSum, SecureSetup
from fedtrain.secure.protocol import (
    ProtocolError,
    SecureAggregationAborted,
    SecureClient,
    SecureServer,
    sum_rejection_reason,
)
from fedtrain.secure.setting import SecureSettings
from fedtrain.types import ClientUpdate, UpdateKind
from fedtrain.validation import rejection_reason

log = logging.getLogger(__name__)

AGGREGATE_ID = "secure-aggregate"
_DROPOUT_STREAM = 0x5EC
_NOISE_STREAM = 0x0153

T = TypeVar("T")


def aggregate_update(
    result: AggregateSum, setup: SecureSetup, kind: UpdateKind, device: torch.device
) -> ClientUpdate:
    """The one update the engine sees from a secure round: the survivors'
    weighted mean, their summed weight, and how many they were.

    The weight is the one slot of the sum the coordinator divides by, and any
    client can write any ring element into it. :meth:`SecureServer.collect_unmask`
    already refuses a summed weight outside ``[m, m · max_weight]`` for ``m``
    survivors and a sum larger than honest clamped contributions allow
    (:func:`fedtrain.secure.protocol.sum_rejection_reason`); the check is
    repeated here for any other source of an :class:`AggregateSum`, and
    raises :class:`SecureAggregationAborted`, the round-skipping path, rather
    than divide by zero or release an amplified mean.
    """
    reason = sum_rejection_reason(result.total, result.weight, len(result.contributors), setup)
    if reason is not None:
        raise SecureAggregationAborted(f"the unmasked sum cannot be released: {reason}")
    mean = result.total * (setup.max_weight / result.weight)
    return ClientUpdate(
        client_id=AGGREGATE_ID,
        vector=torch.from_numpy(mean).to(dtype=torch.float32, device=device),
        num_examples=result.weight,
        kind=kind,
        contributors=len(result.contributors),
    )


class SecureAggregationBackend:
    """Runs ``inner``'s training, then SecAgg+ over the clients' updates."""

    def __init__(
        self,
        inner: Backend,
        settings: SecureSettings,
        seed: int,
        weighted: bool,
        secure_noise: bool = True,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.seed = seed
        self.weighted = weighted
        self.secure_noise = secure_noise

    def _noise(self, rnd: int, index: int) -> NoiseSource:
        seed = int(np.random.SeedSequence([self.seed, rnd, index, _NOISE_STREAM]).generate_state(1)[0])
        return noise_source(self.secure_noise, seed)

    def _dropouts(self, rnd: int, count: int) -> set[int]:
        """Clients that the simulation drops after they shared their keys (seeded per round)."""
        if self.settings.simulated_dropout <= 0:
            return set()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, rnd, _DROPOUT_STREAM]))
        return set(np.flatnonzero(rng.random(count) < self.settings.simulated_dropout).tolist())

    def _weight(self, update: ClientUpdate, setup: SecureSetup) -> int:
        return min(update.num_examples, setup.max_weight)

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        outcome = self.inner.train_round(rnd, clients, task, params)
        failures = list(outcome.failures)
        ready: list[ClientUpdate] = []
        for update in outcome.updates:
            reason = rejection_reason(update, params.numel(), task.kind)
            if reason is None:
                ready.append(update)
            else:
                failures.append(ClientFailure(update.client_id, f"client refused to mask its update: {reason}"))
        if not ready:
            return RoundOutcome((), tuple(failures))
        noise = task.privacy.distributed_noise
        graph = self.settings.graph(len(ready))
        setup = self.settings.setup(
            graph,
            vector_length=params.numel(),
            noise_stddev=noise / math.sqrt(len(clients)) if noise > 0 else 0.0,
            weighted=self.weighted and noise == 0,
        )
        ids = [u.client_id for u in ready]
        dropouts = self._dropouts(rnd, len(ready))
        try:
            result = run_in_process(
                setup,
                SecureServer(setup, graph),
                [SecureClient(i, setup, self._noise(rnd, i) if noise > 0 else None) for i in range(len(ready))],
                [u.vector.detach().cpu().numpy() for u in ready],
                [self._weight(u, setup) for u in ready],
                dropouts,
            )
            aggregate = aggregate_update(result, setup, task.kind, params.device)
        except SecureAggregationAborted as exc:
            log.warning("round %d: secure aggregation aborted, round skipped: %s", rnd, exc)
            failures.extend(ClientFailure(cid, f"secure aggregation aborted: {exc}") for cid in ids)
            return RoundOutcome((), tuple(failures))
        for index, reason in result.excluded:
            why = "dropped after sharing keys (secure.simulated_dropout)" if index in dropouts else reason
            failures.append(ClientFailure(ids[index], f"secure aggregation: {why}"))
        return RoundOutcome((aggregate,), tuple(failures))


def _step_live_clients_(
    clients: Sequence[SecureClient], alive: set[int], step: Callable[[SecureClient], T]
) -> list[T]:
    """``step`` for every client in ``alive``; a client whose step raises is
    removed from ``alive`` (it dropped out)."""
    out: list[T] = []
    for c in clients:
        if c.index not in alive:
            continue
        try:
            out.append(step(c))
        except (ProtocolError, ValueError) as exc:
            log.debug("secure aggregation: client %d dropped: %s", c.index, exc)
            alive.discard(c.index)
    return out


def run_in_process(
    setup: SecureSetup,
    server: SecureServer,
    clients: Sequence[SecureClient],
    updates: Sequence[np.ndarray],
    weights: Sequence[int],
    dropouts: set[int],
) -> AggregateSum:
    """One protocol run with every message handed over in process.

    ``dropouts`` stop responding after the share-keys stage (the case that
    forces the coordinator to reconstruct pairwise masks). Raises
    :class:`SecureAggregationAborted` when too few clients remain.
    """
    if not len(clients) == len(updates) == len(weights) == setup.num_clients:
        raise ValueError(
            f"{len(clients)} clients, {len(updates)} updates, {len(weights)} weights: "
            f"each must number setup.num_clients = {setup.num_clients}"
        )
    alive = set(range(setup.num_clients))
    step = _step_live_clients_
    neighbourhoods = server.collect_adverts(step(clients, alive, lambda c: c.advertise()))
    alive &= set(neighbourhoods)
    deliveries = server.collect_shares(step(clients, alive, lambda c: c.share_keys(neighbourhoods[c.index])))
    alive &= set(deliveries)
    alive -= dropouts
    requests = server.collect_masked(
        step(clients, alive, lambda c: c.masked_input(deliveries[c.index], updates[c.index], weights[c.index]))
    )
    alive &= set(requests)
    return server.collect_unmask(step(clients, alive, lambda c: c.unmask(requests[c.index])))
