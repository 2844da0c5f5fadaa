"""Secure aggregation in simulation: a decorator of the training executor
that hands the engine only the sum.

The inner executor plays the clients' local training; this wrapper then plays
both sides of one SecAgg+ round (:mod:`fedtrain.secure.protocol`) in this
process: one :class:`SecureClient` per client that trained, one
:class:`SecureServer`, the stage messages handed from one to the other as a
network would carry them. A deployment carries the same messages over
Flower's Message API; nothing here is specific to simulation but the
transport and the simulated dropouts.

The round itself (set-up, the four stages, aborts, the failures reported,
the one :class:`~fedtrain.types.AggregateUpdate` the engine sees) is
:func:`fedtrain.secure.round.run_secure_round`, the same as in a deployment;
this module supplies its channel, :class:`InProcessChannel`. Per-client
metrics (training loss) are not reported: the coordinator must not see
per-client values.

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
from typing import Callable, Collection, Mapping, Sequence, TypeVar

import numpy as np
import torch

from fedtrain.privacy.noise import NoiseSource, noise_source
from fedtrain.secure.messages import (
    AdvertiseRequest,
    AggregateSum,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    SecureSetup,
    ShareDelivery,
    SharedKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtrain.secure.protocol import ProtocolError, SecureClient, SecureServer
from fedtrain.secure.round import ProtocolRun, Replies, run_secure_round
from fedtrain.secure.setting import SecureSettings
from fedtrain.training.compressing import CompressingExecutor
from fedtrain.training.executor import Executor
from fedtrain.training.train_task import TrainTask
from fedtrain.types import RoundOutcome
from fedtrain.validation import split_valid

log = logging.getLogger(__name__)

_DROPOUT_STREAM = 0x5EC
_NOISE_STREAM = 0x0153

SIMULATED_DROPOUT = "dropped after sharing keys (secure.simulated_dropout)"
"""Why a client that the simulation drops on purpose is left out of the sum."""

I = TypeVar("I")
R = TypeVar("R")


class InProcessChannel:
    """A :class:`~fedtrain.secure.round.SecureChannel` whose clients are
    :class:`SecureClient` objects in this process, each message handed over
    as a network would carry it.

    ``open_client`` makes (or finds) the client that answers an
    :class:`AdvertiseRequest`; ``contribution`` gives a client's clear update
    and weight when it masks. A client whose step raises
    (:class:`ProtocolError`, :class:`ValueError`) drops out without a reason
    of the channel's: the coordinator's exclusion says why. ``dropouts`` stop
    responding after sharing keys (the case that forces the coordinator to
    reconstruct pairwise masks), with :data:`SIMULATED_DROPOUT` as the reason.
    """

    def __init__(
        self,
        open_client: Callable[[AdvertiseRequest], SecureClient],
        contribution: Callable[[SecureClient], tuple[np.ndarray, int]],
        dropouts: Collection[int] = (),
    ) -> None:
        self.open_client = open_client
        self.contribution = contribution
        self.dropouts = frozenset(dropouts)
        self.clients: dict[int, SecureClient] = {}

    def _step(self, outgoing: Mapping[int, I], step: Callable[[SecureClient, I], R]) -> tuple[R, ...]:
        """``step`` for the client of every index in ``outgoing``, with its
        message; a client whose step raises sends nothing."""
        replies: list[R] = []
        for index in sorted(outgoing):
            client = self.clients[index]
            try:
                replies.append(step(client, outgoing[index]))
            except (ProtocolError, ValueError) as exc:
                log.debug("secure aggregation: client %d dropped: %s", client.index, exc)
        return tuple(replies)

    def advertise(self, requests: Mapping[int, AdvertiseRequest]) -> Replies[KeyAdvert]:
        self.clients = {index: self.open_client(request) for index, request in sorted(requests.items())}
        return Replies(self._step(requests, lambda client, _: client.advertise()))

    def share_keys(self, neighbourhoods: Mapping[int, Neighbourhood]) -> Replies[SharedKeys]:
        return Replies(self._step(neighbourhoods, lambda client, peers: client.share_keys(peers)))

    def masked_input(self, deliveries: Mapping[int, ShareDelivery]) -> Replies[MaskedInput]:
        kept = {i: d for i, d in deliveries.items() if i not in self.dropouts}
        dropped = {i: SIMULATED_DROPOUT for i in sorted(deliveries) if i in self.dropouts}

        def mask(client: SecureClient, delivery: ShareDelivery) -> MaskedInput:
            update, weight = self.contribution(client)
            return client.masked_input(delivery, update, weight)

        return Replies(self._step(kept, mask), dropped)

    def unmask(self, requests: Mapping[int, UnmaskRequest]) -> Replies[UnmaskResponse]:
        return Replies(self._step(requests, lambda client, request: client.unmask(request)))


class InProcessSecureAggregation:
    """Runs ``inner``'s training, then SecAgg+ over the clients' updates.

    When ``inner`` compresses with ``randk`` (a :class:`CompressingExecutor`
    with ``dense``) and ``compact`` holds, SecAgg+ runs on the round's ``k``
    kept coordinates alone (``coordinates`` of
    :func:`~fedtrain.secure.round.run_secure_round`): each client masks its
    kept values in index order and refuses a setup of any other length.
    ``compact = False`` masks the whole decoded vector instead, the same sum
    at ``P / k`` times the bytes (kept as the reference the tests compare
    with)."""

    def __init__(
        self,
        inner: Executor,
        settings: SecureSettings,
        seed: int,
        weighted: bool,
        secure_noise: bool = True,
        compact: bool = True,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.seed = seed
        self.weighted = weighted
        self.secure_noise = secure_noise
        self.compact = compact

    def _coordinates(self, rnd: int, numel: int) -> torch.Tensor | None:
        if not self.compact or not isinstance(self.inner, CompressingExecutor):
            return None
        return self.inner.secure_coordinates(rnd, numel)

    def _noise(self, rnd: int, index: int) -> NoiseSource:
        seed = int(np.random.SeedSequence([self.seed, rnd, index, _NOISE_STREAM]).generate_state(1)[0])
        return noise_source(self.secure_noise, seed)

    def _dropouts(self, rnd: int, count: int) -> set[int]:
        """Clients that the simulation drops after they shared their keys (seeded per round)."""
        if self.settings.simulated_dropout <= 0:
            return set()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, rnd, _DROPOUT_STREAM]))
        return set(np.flatnonzero(rng.random(count) < self.settings.simulated_dropout).tolist())

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        outcome = self.inner.train_round(rnd, clients, task, params)
        ready, refused = split_valid(outcome.updates, params.numel(), task.kind, "client refused to mask its update: ")
        failures = [*outcome.failures, *refused]
        noise = task.privacy.distributed_noise
        coordinates = self._coordinates(rnd, params.numel())
        length = params.numel() if coordinates is None else coordinates.numel()

        def open_client(request: AdvertiseRequest) -> SecureClient:
            index = request.recipient
            return SecureClient(index, request.setup, self._noise(rnd, index) if noise > 0 else None)

        def contribution(client: SecureClient) -> tuple[np.ndarray, int]:
            if client.setup.vector_length != length:
                raise ValueError(
                    f"setup.vector_length = {client.setup.vector_length}, this client masks {length} values"
                )
            update = ready[client.index]
            vector = update.vector.detach().cpu()
            if coordinates is not None:
                vector = vector[coordinates]
            return vector.numpy(), min(update.num_examples, client.setup.max_weight)

        channel = InProcessChannel(open_client, contribution, self._dropouts(rnd, len(ready)))
        secure = run_secure_round(
            channel, self.settings, rnd=rnd, ids=[u.client_id for u in ready], planned=len(clients),
            params=params, kind=task.kind, distributed_noise=noise, weighted=self.weighted,
            coordinates=coordinates,
        )
        return secure.outcome(failures)


def run_in_process(
    setup: SecureSetup,
    server: SecureServer,
    clients: Sequence[SecureClient],
    updates: Sequence[np.ndarray],
    weights: Sequence[int],
    dropouts: set[int],
) -> AggregateSum:
    """One protocol run of prebuilt ``clients`` (``updates[i]`` and
    ``weights[i]`` are client ``i``'s), every message handed over in process.

    ``dropouts`` stop responding after the share-keys stage. Raises
    :class:`SecureAggregationAborted` when too few clients remain.
    """
    if not len(clients) == len(updates) == len(weights) == setup.num_clients:
        raise ValueError(
            f"{len(clients)} clients, {len(updates)} updates, {len(weights)} weights: "
            f"each must number setup.num_clients = {setup.num_clients}"
        )
    channel = InProcessChannel(
        lambda request: clients[request.recipient],
        lambda client: (updates[client.index], weights[client.index]),
        dropouts,
    )
    return ProtocolRun(server, channel).run()
