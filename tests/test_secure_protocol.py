"""SecAgg+ protocol: exact sums under tolerated dropouts, clean aborts beyond
them, masked vectors that look uniform, malformed inputs excluded; the round
driver's failures over a channel that loses a client at each stage."""

from __future__ import annotations

import secrets
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
import torch
from scipy import stats

from fedtrain.transport.in_process import run_in_process
from fedtrain.secure.graph import NeighbourGraph, default_degree, threshold_for
from fedtrain.secure.messages import (
    AdvertiseRequest,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    SecureSetup,
    ShareDelivery,
    SharedKeys,
    UnmaskRequest,
    UnmaskResponse,
    wire_bytes,
)
from fedtrain.secure.protocol import (
    ProtocolError,
    SecureAggregationAborted,
    SecureClient,
    SecureServer,
    ServerStage,
)
from fedtrain.secure.round import Replies, SecureRound, run_secure_round
from fedtrain.secure.setting import SecureSettings
from fedtrain.secure.shamir import PRIME, Share, reconstruct, split
from fedtrain.types import AggregateOrigin, ClientFailure, UpdateKind

SIGNIFICANCE = 1e-6
"""Uniformity tests reject only below this p-value: a correct masker fails
once in a million runs, a broken one (see the control) at p ≈ 0."""


def _setup(n: int, length: int, bits: int = 32, max_weight: int = 100, threshold: int = 2) -> SecureSetup:
    return SecureSetup(secrets.token_bytes(16), n, length, bits, 1.0, max_weight, threshold)


def _tolerated(graph: NeighbourGraph, t: int, survivors: set[int], responders: set[int]) -> bool:
    """Whether every mask can be removed: each survivor's seed and each dropped
    client's key (when a survivor masked with it) has t responding holders."""
    if not survivors:
        return False
    for u in range(graph.size):
        holders = set(graph.neighbours[u]) & responders
        needed = u in survivors or bool(set(graph.neighbours[u]) & survivors)
        if needed and len(holders) < t:
            return False
    return True


def _plain_sum(x: np.ndarray, w: Sequence[int], keep: Sequence[int], max_weight: int) -> np.ndarray:
    return sum((x[i].astype(np.float64) * (w[i] / max_weight) for i in keep), np.zeros(x.shape[1]))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 10),
    length=st.integers(1, 12),
    bits=st.sampled_from([16, 24, 32, 64]),
    fraction=st.sampled_from([0.5, 0.5, 0.75, 1.0]),
    data=st.data(),
)
def test_unmasked_sum_is_the_plain_sum_or_the_round_aborts_cleanly(
    n: int, length: int, bits: int, fraction: float, data: st.DataObject
) -> None:
    degree = data.draw(st.one_of(st.just(n - 1), st.integers(1, n - 1)), label="degree")
    graph = NeighbourGraph.harary(n, degree)
    t = threshold_for(min(len(ns) for ns in graph.neighbours), fraction)
    setup = _setup(n, length, bits=bits, threshold=t)
    at_most = st.sampled_from([0, 1, 1, 2, n])
    dropped = data.draw(st.sets(st.integers(0, n - 1), max_size=data.draw(at_most)), label="dropped after sharing")
    survivors = set(range(n)) - dropped
    silent = data.draw(
        st.sets(st.sampled_from(sorted(survivors)), max_size=data.draw(at_most)) if survivors else st.just(set()),
        label="silent at unmask",
    )
    x = np.asarray(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n * length, max_size=n * length)),
                   dtype=np.float32).reshape(n, length)
    w = data.draw(st.lists(st.integers(1, setup.max_weight), min_size=n, max_size=n), label="weights")
    server = SecureServer(setup, graph)
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    masked = [clients[i].masked_input(deliveries[i], x[i], w[i]) for i in sorted(survivors)]

    if not _tolerated(graph, t, survivors, survivors):
        event("aborts at masked input")
        with pytest.raises(SecureAggregationAborted, match="nothing was revealed|no client"):
            server.collect_masked(masked)
        assert server.stage is ServerStage.ABORTED
        return
    requests = server.collect_masked(masked)
    responses = [clients[i].unmask(requests[i]) for i in sorted(survivors - silent)]
    if not _tolerated(graph, t, survivors, survivors - silent):
        event("aborts at unmask")
        with pytest.raises(SecureAggregationAborted, match="no sum is released"):
            server.collect_unmask(responses)
        assert server.stage is ServerStage.ABORTED
        return
    event("unmasks" + (" after dropouts" if dropped or silent else ""))
    result = server.collect_unmask(responses)

    expected = _plain_sum(x, w, sorted(survivors), setup.max_weight)
    assert result.contributors == tuple(sorted(survivors))
    assert result.weight == sum(w[i] for i in survivors)
    assert np.abs(result.total - expected).max() <= setup.quantizer.sum_error_bound(len(survivors)) + 1e-12
    assert server.stage is ServerStage.DONE


def test_more_dropouts_than_tolerated_abort_before_anything_is_revealed() -> None:
    n = 6
    setup = _setup(n, 4, threshold=4)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    survivors = [0, 1, 2, 3]  # each survivor has 3 surviving neighbours < t = 4

    with pytest.raises(SecureAggregationAborted, match="too many dropouts.*threshold is 4"):
        server.collect_masked([clients[i].masked_input(deliveries[i], np.ones(4), 1) for i in survivors])
    with pytest.raises(ProtocolError):
        server.collect_unmask([])


def _masked_vector_of_one_client(bits: int, length: int, update: np.ndarray) -> tuple[np.ndarray, SecureSetup]:
    n = 3
    setup = _setup(n, length, bits=bits, max_weight=1)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    return clients[0].masked_input(deliveries[0], update, 1).vector, setup


@pytest.mark.parametrize("bits", [20, 32])
def test_a_masked_update_is_indistinguishable_from_uniform_over_the_ring(bits: int) -> None:
    length = 200_000
    update = np.linspace(-0.5, 0.5, length, dtype=np.float32)  # far from uniform on its own
    masked, setup = _masked_vector_of_one_client(bits, length, update)
    values = masked[:length].astype(np.float64) / setup.ring.modulus
    plain = setup.quantizer.encode(update).astype(np.float64) / setup.ring.modulus

    top_bytes = (values * 256).astype(np.int64)
    chi2 = stats.chisquare(np.bincount(top_bytes, minlength=256))
    ks = stats.kstest(values, "uniform")
    control = stats.kstest(plain, "uniform")

    assert chi2.pvalue > SIGNIFICANCE
    assert ks.pvalue > SIGNIFICANCE
    assert control.pvalue < SIGNIFICANCE


@pytest.mark.parametrize(
    "bad_vector",
    [
        np.zeros(3, dtype=np.uint32),
        np.zeros(6, dtype=np.float64),
        np.zeros((2, 3), dtype=np.uint32),
        [0, 0, 0, 0, 0, 0],
    ],
    ids=["short", "float64", "2-d", "list"],
)
def test_a_malformed_masked_vector_excludes_its_sender_and_the_round_completes(bad_vector: object) -> None:
    n, length = 5, 5
    setup = _setup(n, length, threshold=3)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    x = np.random.default_rng(0).uniform(-1, 1, (n, length)).astype(np.float32)
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    masked = [clients[i].masked_input(deliveries[i], x[i], 7) for i in range(n)]
    masked[2] = MaskedInput(2, bad_vector)  # type: ignore[arg-type]

    requests = server.collect_masked(masked)
    result = server.collect_unmask([clients[i].unmask(requests[i]) for i in requests])

    keep = [0, 1, 3, 4]
    assert result.contributors == tuple(keep)
    assert dict(result.excluded)[2].startswith("masked vector")
    assert np.abs(result.total - _plain_sum(x, [7] * n, keep, 100)).max() <= setup.quantizer.sum_error_bound(4)


def test_a_wrong_share_is_detected_and_aborts_instead_of_a_wrong_sum() -> None:
    n = 4
    setup = _setup(n, 3, threshold=3)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    requests = server.collect_masked([c.masked_input(deliveries[c.index], np.ones(3), 1) for c in clients])
    responses = [clients[i].unmask(requests[i]) for i in range(n)]
    honest = responses[1].seed_shares[0]
    forged = type(honest)(honest.owner, Share(honest.share.x, (honest.share.y + 1) % PRIME))
    responses[1] = UnmaskResponse(1, (forged,) + responses[1].seed_shares[1:], responses[1].key_shares)

    with pytest.raises(SecureAggregationAborted, match="commitment|inconsistent"):
        server.collect_unmask(responses)


def test_a_client_never_reveals_both_secrets_of_one_neighbour() -> None:
    n = 3
    setup = _setup(n, 2)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    clients[0].masked_input(deliveries[0], np.zeros(2), 1)

    with pytest.raises(ProtocolError, match="both survivor and dropped"):
        clients[0].unmask(UnmaskRequest(0, survivors=(1, 2), dropped=(1,)))


def test_shamir_any_threshold_shares_reconstruct_and_fewer_are_refused() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, [1, 2, 3, 4, 5], threshold=3)

    assert reconstruct(shares[2:], 3) == secret
    assert reconstruct([shares[4], shares[0], shares[2]], 3) == secret
    with pytest.raises(ValueError, match="inconsistent"):
        reconstruct(shares[:2] + (Share(9, 12345),), 3)
    with pytest.raises(ValueError, match="at least threshold = 3"):
        reconstruct(shares[:2], 3)


def test_sparse_graph_keeps_per_client_traffic_logarithmic() -> None:
    degrees = {n: default_degree(n) for n in (10, 100, 1000, 10_000)}

    assert degrees[10] == 9
    assert degrees[1000] <= 3 * 10 + 2
    assert degrees[10_000] - degrees[1000] <= degrees[1000] - degrees[100] + 2
    graph = NeighbourGraph.harary(200, degrees[1000])
    assert {len(ns) for ns in graph.neighbours} == {degrees[1000]}


def test_in_process_round_with_dropouts_matches_the_survivors_sum_and_counts_bytes() -> None:
    n, length = 12, 50
    graph = NeighbourGraph.harary(n, default_degree(n) - 4)
    setup = _setup(n, length, threshold=threshold_for(graph.min_degree, 0.5))
    x = np.random.default_rng(1).uniform(-1, 1, (n, length)).astype(np.float32)
    weights = list(range(1, n + 1))
    clients = [SecureClient(i, setup) for i in range(n)]

    result = run_in_process(setup, SecureServer(setup, graph), clients, list(x), weights, dropouts={3})

    keep = [i for i in range(n) if i != 3]
    assert result.weight == sum(weights) - 4
    assert np.abs(result.total - _plain_sum(x, weights, keep, 100)).max() <= setup.quantizer.sum_error_bound(n)
    assert wire_bytes(MaskedInput(0, np.zeros(setup.masked_length, np.uint32))) == 4 + 4 * (length + 1)


def test_a_client_refuses_to_mask_with_fewer_peers_than_the_threshold() -> None:
    n = 4
    setup = _setup(n, 2, threshold=3)
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    neighbourhoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(neighbourhoods[c.index]) for c in clients])
    isolating = type(deliveries[0])(0, deliveries[0].shares[:1])

    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        clients[0].masked_input(isolating, np.zeros(2), 1)


I = TypeVar("I")
R = TypeVar("R")


class _LossyChannel:
    """A channel of honest in-process clients that loses the clients
    ``lose[stage]`` at each named stage, with the reason ``"<stage>: gone"``, and whose
    client ``garble`` sends a masked input one element short (the coordinator
    excludes it without a reason of the channel's)."""

    def __init__(self, updates: np.ndarray, lose: Mapping[str, set[int]], garble: int | None = None) -> None:
        self.updates = updates
        self.lose = lose
        self.garble = garble
        self.clients: dict[int, SecureClient] = {}

    def _answer(self, stage: str, outgoing: Mapping[int, I], step: Callable[[SecureClient, I], R]) -> Replies[R]:
        lost = self.lose.get(stage, set()) & set(outgoing)
        replies = tuple(step(self.clients[i], m) for i, m in sorted(outgoing.items()) if i not in lost)
        return Replies(replies, {i: f"{stage}: gone" for i in lost})

    def advertise(self, requests: Mapping[int, AdvertiseRequest]) -> Replies[KeyAdvert]:
        self.clients = {i: SecureClient(i, r.setup) for i, r in requests.items()}
        return self._answer("advertise", requests, lambda c, _: c.advertise())

    def share_keys(self, neighbourhoods: Mapping[int, Neighbourhood]) -> Replies[SharedKeys]:
        return self._answer("share_keys", neighbourhoods, lambda c, n: c.share_keys(n))

    def masked_input(self, deliveries: Mapping[int, ShareDelivery]) -> Replies[MaskedInput]:
        def mask(c: SecureClient, d: ShareDelivery) -> MaskedInput:
            masked = c.masked_input(d, self.updates[c.index], c.index + 1)
            return MaskedInput(c.index, masked.vector[:-1]) if c.index == self.garble else masked

        return self._answer("masked_input", deliveries, mask)

    def unmask(self, requests: Mapping[int, UnmaskRequest]) -> Replies[UnmaskResponse]:
        return self._answer("unmask", requests, lambda c, r: c.unmask(r))


_IDS = [f"c{i}" for i in range(12)]
_SETTINGS = SecureSettings(bits=32, clip_range=1.0, max_weight=100, neighbours=0, threshold=0.5,
                           simulated_dropout=0.0)


def _drive(channel: _LossyChannel) -> SecureRound:
    return run_secure_round(
        channel, _SETTINGS, rnd=1, ids=_IDS, planned=14, params=torch.zeros(channel.updates.shape[1]),
        kind=UpdateKind.DELTA, distributed_noise=0.0, weighted=True,
    )


def test_the_round_driver_reports_a_client_lost_at_each_stage() -> None:
    x = np.random.default_rng(3).uniform(-1, 1, (12, 4)).astype(np.float32)
    lose = {"advertise": {0}, "share_keys": {1}, "masked_input": {2}, "unmask": {3}}

    secure = _drive(_LossyChannel(x, lose, garble=4))

    assert secure.failures == (
        ClientFailure("c0", "advertise: gone"),  # lost opening the round: the channel's reason as is
        ClientFailure("c1", "secure aggregation: share_keys: gone"),
        ClientFailure("c2", "secure aggregation: masked_input: gone"),
        ClientFailure("c4", "secure aggregation: masked vector shape (4,), expected (5,)"),  # the coordinator's
    ), "c3 went silent only at unmask: its input is still in the sum"
    assert secure.lost == {0, 1, 2, 4}
    aggregate = secure.aggregate
    assert aggregate is not None and aggregate.origin is AggregateOrigin.SECURE_SUM
    survivors = [3, *range(5, 12)]
    weights = [i + 1 for i in survivors]
    expected = sum(x[i].astype(np.float64) * (i + 1) for i in survivors) / sum(weights)
    assert (aggregate.num_examples, aggregate.contributors, aggregate.unit_weights) == (sum(weights), 8, False)
    np.testing.assert_allclose(aggregate.vector.numpy(), expected, atol=1e-6)


def test_the_round_driver_fails_everyone_who_joined_when_the_round_aborts() -> None:
    x = np.zeros((12, 4), dtype=np.float32)
    # Five of the eleven clients that shared keys drop before masking: each
    # survivor keeps 5 neighbours, fewer than the threshold of 6.
    channel = _LossyChannel(x, {"advertise": {0}, "masked_input": {1, 2, 3, 4, 5}})

    secure = _drive(channel)

    assert secure.aggregate is None
    assert secure.failures[0] == ClientFailure("c0", "advertise: gone")
    assert [f.client_id for f in secure.failures[1:]] == _IDS[1:]
    assert all(f.reason.startswith("secure aggregation aborted: masked input: too many dropouts")
               for f in secure.failures[1:])
    assert secure.lost == {0, 1, 2, 3, 4, 5}, "only those the channel lost, not those failed by the abort"
    assert secure.outcome([ClientFailure("x", "earlier")]).failures[0] == ClientFailure("x", "earlier")


def test_the_round_driver_with_nobody_to_aggregate_reports_nothing() -> None:
    secure = run_secure_round(
        _LossyChannel(np.zeros((0, 1), dtype=np.float32), {}), _SETTINGS, rnd=1, ids=[], planned=3,
        params=torch.zeros(1), kind=UpdateKind.DELTA, distributed_noise=0.0, weighted=True,
    )

    assert (secure.aggregate, secure.failures, secure.lost) == (None, (), frozenset())
