"""One SecAgg+ round, driven the same way over any transport.

A simulation hands the stage messages to :class:`~fedtrain.secure.protocol.SecureClient`
objects in process (:mod:`fedtrain.transport.in_process`); a deployment
carries them over Flower messages (:mod:`fedtrain.transport.flower`). What a
round *does* does not depend on which: this module builds the round's graph
and public setup, drives :class:`~fedtrain.secure.protocol.SecureServer`
through its four stages over a :class:`SecureChannel`, handles an abort,
reports every client left out as a :class:`~fedtrain.types.ClientFailure`,
and turns the unmasked sum into the engine's single update. A transport
supplies only the channel: how a stage's messages reach the clients, and why
a client did not answer.

What the engine and the strategy see: one :class:`~fedtrain.types.AggregateUpdate`
per round, ``origin = SECURE_SUM`` (``client_id = "secure-aggregate"``), whose
vector is the weighted mean ``Σ w_i Δ_i / Σ w_i`` of the survivors,
``num_examples = Σ w_i`` and ``contributors`` the number of survivors, and
``unit_weights`` when every weight is 1. Weights are
``min(num_examples, max_weight)``, or 1 when the strategy averages unweighted
or under distributed DP; each client puts its weight into the masked vector
(its last element), so the coordinator learns only their total.

Failures, in this order: a client the channel loses while opening the round
(the opening may carry the training, as over Flower) failed its round's work,
reported with the channel's reason as is; when too few remain to unmask, the
round aborts (:class:`SecureAggregationAborted`), every other client fails
with ``"secure aggregation aborted: …"`` and the engine gets no update (the
round is skipped); otherwise every client left out of the sum fails with
``"secure aggregation: …"``, the channel's reason for it when it gave one,
else the coordinator's.

This module sits below the transports, the training code and the engine and
imports none of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Generic, Mapping, Protocol, Sequence, TypeVar

import torch

from fedtrain.compression import CompactSecureAggregate
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
from fedtrain.secure.protocol import SecureAggregationAborted, SecureServer, sum_rejection_reason
from fedtrain.secure.setting import SecureSettings
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientFailure, RoundOutcome, UpdateKind

log = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True)
class Replies(Generic[M]):
    """What one exchange brought back: the clients' replies (as received,
    unchecked: :class:`SecureServer` checks them) and, by client index, why
    each client that did not answer properly dropped out."""

    messages: tuple[M, ...]
    dropped: Mapping[int, str] = field(default_factory=dict)


class SecureChannel(Protocol):
    """How one round's stage messages reach clients ``0 … n−1`` and their
    replies come back. Each method sends every addressed client its message
    and returns the replies with the reasons of those that dropped out; a
    client the coordinator no longer addresses is not sent anything."""

    def advertise(self, requests: Mapping[int, AdvertiseRequest]) -> Replies[KeyAdvert]:
        """Open the round: each client its index and the setup; replies: key adverts."""
        ...

    def share_keys(self, neighbourhoods: Mapping[int, Neighbourhood]) -> Replies[SharedKeys]:
        """Each client its neighbours' adverts; replies: sealed shares."""
        ...

    def masked_input(self, deliveries: Mapping[int, ShareDelivery]) -> Replies[MaskedInput]:
        """Each client the shares addressed to it; replies: masked inputs."""
        ...

    def unmask(self, requests: Mapping[int, UnmaskRequest]) -> Replies[UnmaskResponse]:
        """Each survivor the shares asked of it; replies: those shares."""
        ...


class ProtocolRun:
    """One protocol run: ``server`` through its four stages, the messages
    over ``channel``, remembering who dropped out and when.

    ``unjoined``: the clients the channel lost while opening the round, with
    its reasons; they never advertised keys, so they never took part.
    ``dropped``: the clients it lost later, with its first reason for each.
    Both are filled as the run goes, so they hold what was learnt even when
    :meth:`run` raises.
    """

    def __init__(self, server: SecureServer, channel: SecureChannel) -> None:
        self.server = server
        self.channel = channel
        self.unjoined: dict[int, str] = {}
        self.dropped: dict[int, str] = {}

    def _kept(self, replies: Replies[M]) -> tuple[M, ...]:
        for index, reason in replies.dropped.items():
            self.dropped.setdefault(index, reason)
        return replies.messages

    def run(self) -> AggregateSum:
        """The sum; raises :class:`SecureAggregationAborted` when too few clients remain."""
        server, channel = self.server, self.channel
        opening = channel.advertise({i: AdvertiseRequest(i, server.setup) for i in range(server.setup.num_clients)})
        self.unjoined.update(opening.dropped)
        neighbourhoods = server.collect_adverts(opening.messages)
        deliveries = server.collect_shares(self._kept(channel.share_keys(neighbourhoods)))
        requests = server.collect_masked(self._kept(channel.masked_input(deliveries)))
        return server.collect_unmask(self._kept(channel.unmask(requests)))


def aggregate_update(
    result: AggregateSum, setup: SecureSetup, kind: UpdateKind, device: torch.device
) -> AggregateUpdate:
    """The one update the engine sees from a secure round: the survivors'
    weighted mean, their summed weight, and how many they were.

    The weight is the one slot of the sum the coordinator divides by, and any
    client can write any ring element into it. :meth:`SecureServer.collect_unmask`
    already refuses a summed weight outside ``[m, m · max_weight]`` for ``m``
    survivors and a sum larger than honest clamped contributions allow
    (:func:`fedtrain.secure.protocol.sum_rejection_reason`); the check is
    repeated here for any other source of an :class:`AggregateSum`, and
    raises :class:`SecureAggregationAborted`, the round-skipping path, rather
    than divide by zero or release an amplified mean. With ``max_weight = 1``
    that check pins the summed weight to the survivors' count, which is what
    ``unit_weights`` states.
    """
    reason = sum_rejection_reason(result.total, result.weight, len(result.contributors), setup)
    if reason is not None:
        raise SecureAggregationAborted(f"the unmasked sum cannot be released: {reason}")
    mean = result.total * (setup.max_weight / result.weight)
    return AggregateUpdate(
        vector=torch.from_numpy(mean).to(dtype=torch.float32, device=device),
        num_examples=result.weight,
        kind=kind,
        contributors=len(result.contributors),
        origin=AggregateOrigin.SECURE_SUM,
        unit_weights=setup.max_weight == 1,
    )


@dataclass(frozen=True)
class SecureRound:
    """What a secure round brings back: the aggregate (None when the round
    aborted or nobody took part), the failures it reports, in order, and
    ``lost``, the indices of the clients that dropped out: those left out of
    the sum or, when the round aborted, those the channel lost (not the
    ones that fail only because the round did). A transport that must
    re-contact a client that dropped out uses the last."""

    aggregate: AggregateUpdate | None
    failures: tuple[ClientFailure, ...]
    lost: frozenset[int]

    def outcome(self, earlier: Sequence[ClientFailure]) -> RoundOutcome:
        """The round's :class:`RoundOutcome`: the aggregate, if any, and
        ``earlier`` failures (before the protocol) followed by this round's."""
        updates = () if self.aggregate is None else (self.aggregate,)
        return RoundOutcome(updates, (*earlier, *self.failures))


def run_secure_round(
    channel: SecureChannel,
    settings: SecureSettings,
    *,
    rnd: int,
    ids: Sequence[str],
    planned: int,
    params: torch.Tensor,
    kind: UpdateKind,
    distributed_noise: float,
    weighted: bool,
    coordinates: torch.Tensor | None = None,
) -> SecureRound:
    """One SecAgg+ round among ``ids`` (client ``i`` is ``ids[i]`` on ``channel``).

    ``planned`` is how many clients the round planned (the cohort, including
    those that failed before it): distributed DP's noise ``distributed_noise``
    (std of the whole sum, 0 for none) is split among them, each adding
    ``distributed_noise / √planned``, so a client that drops takes its share
    with it. ``params`` is the global model (its length and device are the
    update's); ``kind`` is the round's update kind. Contributions are
    weighted when ``weighted`` and there is no distributed noise (which needs
    unit weights), else each counts 1. See the module docstring for the
    failures reported.

    ``coordinates`` (``compression.up = 'randk'``: the round's kept
    coordinates, sorted, :func:`fedtrain.compression.secure_coordinates`)
    makes the round's secure length ``k``: the setup announces it, each
    client masks its ``k`` kept values in index order, the coordinator
    checks every masked input against it (never against what a client
    says), and the unmasked ``k``-mean is scattered into the model's layout,
    zero elsewhere, as a :class:`~fedtrain.compression.CompactSecureAggregate`
    that counts the masked inputs' bytes. The sum is the dense path's: the
    ring's scale depends on the clients and the range, not the length, and
    off those coordinates every client's decoded update is zero. Under
    distributed DP each client's noise share goes on the ``k`` coordinates
    only; nothing else is released (the other coordinates are zero for every
    client, whatever the data), and the sensitivity is unchanged, since the
    ``k``-subvector of an update clipped to ``C`` has norm at most ``C``:
    the L2 sensitivity of DP-FedAvg's sum (McMahan et al. 2018), which the
    clients' shares of the Gaussian noise are calibrated to (Kairouz, Liu &
    Steinke 2021), and zeros that do not depend on the data are
    post-processing.
    """
    if not ids:
        return SecureRound(None, (), frozenset())
    if distributed_noise > 0 and settings.fewest_contributors(len(ids)) < settings.fewest_contributors(planned):
        # The budget was checked against the fewest noise shares a round of
        # ``planned`` can release; fewer clients build a graph whose
        # threshold lets a sum out with fewer shares than that.
        log.warning("round %d: %d of %d planned clients reached secure aggregation, too few for distributed DP's "
                    "budget check; round skipped", rnd, len(ids), planned)
        return SecureRound(None, tuple(
            ClientFailure(c, "secure aggregation skipped: too few clients reached it for distributed DP's worst case")
            for c in ids
        ), frozenset())
    graph = settings.graph(len(ids))
    setup = settings.setup(
        graph,
        vector_length=params.numel() if coordinates is None else coordinates.numel(),
        noise_stddev=distributed_noise / math.sqrt(planned) if distributed_noise > 0 else 0.0,
        weighted=weighted and distributed_noise == 0,
    )
    run = ProtocolRun(SecureServer(setup, graph), channel)
    try:
        result = run.run()
        aggregate = aggregate_update(result, setup, kind, params.device)
        if coordinates is not None:
            aggregate = _scattered(aggregate, coordinates, params, setup)
    except SecureAggregationAborted as exc:
        log.warning("round %d: secure aggregation aborted, round skipped: %s", rnd, exc)
        aborted = [
            ClientFailure(cid, f"secure aggregation aborted: {exc}")
            for i, cid in enumerate(ids) if i not in run.unjoined
        ]
        lost = run.unjoined.keys() | run.dropped.keys()
        return SecureRound(None, (*_unjoined(run, ids), *aborted), frozenset(lost))
    excluded = [
        ClientFailure(ids[i], f"secure aggregation: {run.dropped.get(i, reason)}")
        for i, reason in result.excluded if i not in run.unjoined
    ]
    lost = run.unjoined.keys() | {i for i, _ in result.excluded}
    return SecureRound(aggregate, (*_unjoined(run, ids), *excluded), frozenset(lost))


def _scattered(
    aggregate: AggregateUpdate, coordinates: torch.Tensor, params: torch.Tensor, setup: SecureSetup
) -> CompactSecureAggregate:
    """The ``k``-mean ``aggregate`` in the model's layout: its values at
    ``coordinates``, zero elsewhere."""
    vector = torch.zeros(params.numel(), dtype=torch.float32, device=params.device)
    vector[coordinates.to(params.device)] = aggregate.vector
    return CompactSecureAggregate(
        vector=vector, num_examples=aggregate.num_examples, kind=aggregate.kind,
        contributors=aggregate.contributors, origin=aggregate.origin, unit_weights=aggregate.unit_weights,
        masked_nbytes=setup.masked_length * setup.ring.itemsize,
    )


def _unjoined(run: ProtocolRun, ids: Sequence[str]) -> list[ClientFailure]:
    """The failures of the clients lost while opening the round, with the channel's reasons as they are."""
    return [ClientFailure(ids[i], why) for i, why in sorted(run.unjoined.items())]
