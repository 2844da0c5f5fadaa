"""Secure aggregation against deviating parties: the Shamir threshold is a
majority of the graph actually built, a client refuses what a deviating
coordinator could exploit, and a client that forges its weight slot or its
coordinates aborts the round instead of crashing it or amplifying the mean."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from fedtrain import config
from fedtrain.transport.in_process import InProcessSecureAggregation
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig
from fedtrain.types import RoundOutcome
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.secure.graph import NeighbourGraph
from fedtrain.secure.messages import (
    AggregateSum,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    SecureSetup,
    ShareDelivery,
    UnmaskRequest,
)
from fedtrain.secure.protocol import (
    ProtocolError,
    SecureAggregationAborted,
    SecureClient,
    SecureServer,
    ServerStage,
)
from fedtrain.secure.round import aggregate_update
from fedtrain.secure.setting import SecureSettings
from fedtrain.simulation import simulate
from fedtrain.types import ClientUpdate, RoundPlan, UpdateKind

SECURE = ["secure.aggregation=true"]


def _settings(neighbours: int = 0, max_weight: int = 100, clip_range: float = 1.0) -> SecureSettings:
    return SecureSettings(bits=32, clip_range=clip_range, max_weight=max_weight, neighbours=neighbours,
                          threshold=0.5, simulated_dropout=0.0)


def _setup(n: int, threshold: int, length: int = 3, max_weight: int = 100) -> SecureSetup:
    return SecureSetup(secrets.token_bytes(16), n, length, 32, 1.0, max_weight, threshold)


def _keyed(n: int, setup: SecureSetup) -> tuple[list[SecureClient], list[KeyAdvert]]:
    clients = [SecureClient(i, setup) for i in range(n)]
    return clients, [c.advertise() for c in clients]


def _through_masking(
    setup: SecureSetup, x: np.ndarray, weights: Sequence[int]
) -> tuple[SecureServer, list[SecureClient], list[MaskedInput]]:
    n = setup.num_clients
    server = SecureServer(setup, NeighbourGraph.complete(n))
    clients = [SecureClient(i, setup) for i in range(n)]
    hoods = server.collect_adverts([c.advertise() for c in clients])
    deliveries = server.collect_shares([c.share_keys(hoods[c.index]) for c in clients])
    return server, clients, [c.masked_input(deliveries[c.index], x[c.index], weights[c.index]) for c in clients]


def _shifted(message: MaskedInput, slot: int, delta: int, setup: SecureSetup) -> MaskedInput:
    """``message`` with ``delta`` added to one ring slot: what a malicious
    client can send, since nobody but itself sees its input unmasked."""
    vector = message.vector.copy()
    vector[slot] = (int(vector[slot]) + delta) % setup.ring.modulus
    return MaskedInput(message.sender, vector)


# --- 2. the threshold comes from the graph that was built -----------------------------------


@pytest.mark.parametrize("neighbours", [0, 2, 3, 4, 5, 7, 9, 11])
@pytest.mark.parametrize("n", [3, 4, 7, 12, 20, 33])
def test_the_threshold_is_a_majority_of_the_degree_actually_built(n: int, neighbours: int) -> None:
    settings = _settings(neighbours)

    graph = settings.graph(n)
    setup = settings.setup(graph, vector_length=4, noise_stddev=0.0, weighted=True)

    assert setup.num_clients == graph.size == n
    assert graph.min_degree == graph.max_degree  # Harary graphs are regular
    assert 2 * setup.threshold > graph.max_degree, (n, neighbours, setup.threshold, graph.max_degree)
    assert setup.threshold <= graph.min_degree


def test_five_neighbours_build_degree_six_and_threshold_four_not_three() -> None:
    graph = _settings(neighbours=5).graph(20)

    setup = _settings(neighbours=5).setup(graph, vector_length=4, noise_stddev=0.0, weighted=True)

    assert (graph.min_degree, setup.threshold) == (6, 4)


def test_the_coordinator_refuses_a_setup_whose_threshold_is_half_of_its_graph() -> None:
    graph = NeighbourGraph.harary(20, 5)

    with pytest.raises(ValueError, match="threshold = 3: not a strict majority of a client's 6 neighbours"):
        SecureServer(_setup(20, threshold=3), graph)


def test_odd_neighbours_train_through_the_simulation(tmp_path: Path) -> None:
    cfg = config.load(None, SECURE + ["secure.neighbours=5", "data.num_clients=12",
                                      "strategy.clients_per_round=12", "run.rounds=1"])

    result = simulate(cfg, out_dir=tmp_path)

    assert [(r.num_clients, r.num_failed) for r in result.records] == [(12, 0)]


# --- 3. the client refuses what a deviating coordinator could exploit -----------------------


def test_a_client_refuses_a_threshold_that_is_not_a_strict_majority_of_its_neighbours() -> None:
    # t = 3 of 6 neighbours: what the odd-degree bug produced. Two disjoint
    # halves of the neighbours could each reconstruct one of the client's secrets.
    setup = _setup(7, threshold=3)
    clients, adverts = _keyed(7, setup)

    with pytest.raises(ProtocolError, match=r"threshold = 3 with 6 neighbours is not a strict majority"):
        clients[0].share_keys(Neighbourhood(0, tuple(adverts[1:])))
    assert clients[1].share_keys(Neighbourhood(1, tuple(a for a in adverts if a.sender in (0, 2, 3, 4, 5)))).sender == 1


@pytest.mark.parametrize("forgery", ["same mask key", "same share key", "own mask key", "own share key"])
def test_a_client_refuses_neighbours_that_repeat_a_public_key(forgery: str) -> None:
    setup = _setup(4, threshold=2)
    clients, adverts = _keyed(4, setup)
    a0, a1, a2, a3 = adverts
    forged = {
        "same mask key": KeyAdvert(2, a1.mask_public, a2.share_public),
        "same share key": KeyAdvert(2, a2.mask_public, a1.share_public),
        "own mask key": KeyAdvert(2, a0.mask_public, a2.share_public),
        "own share key": KeyAdvert(2, a2.mask_public, a0.share_public),
    }[forgery]

    with pytest.raises(ProtocolError, match="neighbourhood repeats public keys"):
        clients[0].share_keys(Neighbourhood(0, (a1, forged, a3)))
    assert clients[0].stage.value == "share_keys"  # nothing was shared


def test_a_client_refuses_to_unmask_when_fewer_than_threshold_survivors_are_named() -> None:
    n = 5
    setup = _setup(n, threshold=3)
    server, clients, masked = _through_masking(setup, np.zeros((n, 3)), [1] * n)
    requests = server.collect_masked(masked)
    assert len(requests[0].survivors) == 4

    with pytest.raises(ProtocolError, match="names 2 surviving neighbours, fewer than the threshold 3"):
        clients[0].unmask(UnmaskRequest(0, survivors=(1, 2), dropped=(3, 4)))
    assert clients[1].unmask(requests[1]).sender == 1  # the honest request is answered


# --- 4. a forged weight slot or coordinate aborts the round --------------------------------


@pytest.mark.parametrize("target", [0, 1, -5, 10**6], ids=["zero", "one", "negative", "beyond-max"])
def test_a_forged_summed_weight_aborts_the_round_and_releases_no_sum(target: int) -> None:
    n, max_weight = 4, 100
    setup = _setup(n, threshold=3, max_weight=max_weight)
    weights = [40, 50, 60, 70]
    x = np.full((n, 3), 0.5)
    server, clients, masked = _through_masking(setup, x, weights)
    masked[0] = _shifted(masked[0], setup.vector_length, target - sum(weights), setup)
    requests = server.collect_masked(masked)

    with pytest.raises(SecureAggregationAborted, match=r"summed weight = -?\d+: 4 survivors .* allow 4 … 400"):
        server.collect_unmask([c.unmask(requests[c.index]) for c in clients])
    assert server.stage is ServerStage.ABORTED


def test_a_forged_coordinate_that_no_clamped_cohort_could_sum_to_aborts_the_round() -> None:
    n = 4
    setup = _setup(n, threshold=3, max_weight=100)
    server, clients, masked = _through_masking(setup, np.zeros((n, 3)), [1] * n)
    # Weights of 1 in 100 let honest clients sum to at most 4/100 of the clip
    # range per coordinate; client 2 adds a whole clip range to one of them.
    masked[2] = _shifted(masked[2], 1, setup.quantizer.levels, setup)
    requests = server.collect_masked(masked)

    with pytest.raises(SecureAggregationAborted, match="sum coordinate of magnitude"):
        server.collect_unmask([c.unmask(requests[c.index]) for c in clients])


def test_whatever_one_client_writes_the_released_mean_stays_within_the_clip_range() -> None:
    n, max_weight = 5, 100
    rng = np.random.default_rng(7)
    released = aborted = 0
    for _ in range(12):
        setup = _setup(n, threshold=3, max_weight=max_weight)
        weights = [int(w) for w in rng.integers(1, max_weight + 1, n)]
        server, clients, masked = _through_masking(setup, rng.uniform(-3, 3, (n, 3)), weights)
        levels = setup.quantizer.levels
        # Per slot, a shift that may pass the checks (up to two clip ranges, or a
        # weight the survivors allow) or, three times in ten, an arbitrary ring element.
        plausible = [int(rng.integers(-2 * levels, 2 * levels + 1)) for _ in range(setup.vector_length)]
        plausible.append(int(rng.integers(n - sum(weights), n * max_weight - sum(weights) + 1)))
        for slot, delta in enumerate(plausible):
            if rng.random() < 0.3:
                delta = int(rng.integers(0, setup.ring.modulus))
            masked[0] = _shifted(masked[0], slot, delta, setup)
        requests = server.collect_masked(masked)
        try:
            result = server.collect_unmask([c.unmask(requests[c.index]) for c in clients])
        except SecureAggregationAborted:
            aborted += 1
            continue
        released += 1
        mean = aggregate_update(result, setup, UpdateKind.DELTA, torch.device("cpu")).vector
        assert float(mean.abs().max()) <= setup.clip_range * (1 + 1e-6)
        assert n <= result.weight <= n * max_weight
    assert released and aborted  # both outcomes were exercised


def test_honest_updates_beyond_the_clip_range_never_trip_the_check() -> None:
    n, max_weight = 4, 100
    setup = _setup(n, threshold=3, max_weight=max_weight)
    weights = [1, 2, 99, 100]
    x = np.array([[50.0, -50.0, 0.25]] * n)
    server, clients, masked = _through_masking(setup, x, weights)
    requests = server.collect_masked(masked)

    result = server.collect_unmask([c.unmask(requests[c.index]) for c in clients])

    mean = aggregate_update(result, setup, UpdateKind.DELTA, torch.device("cpu")).vector
    assert torch.allclose(mean, torch.tensor([1.0, -1.0, 0.25]), atol=1e-6)  # clamped to ±clip_range, then averaged


def test_aggregate_update_refuses_a_zero_weight_instead_of_dividing_by_it() -> None:
    setup = _setup(3, threshold=2)
    forged = AggregateSum(total=np.zeros(3), weight=0, contributors=(0, 1, 2), excluded=())

    with pytest.raises(SecureAggregationAborted, match="summed weight = 0"):
        aggregate_update(forged, setup, UpdateKind.DELTA, torch.device("cpu"))


class _Fixed:
    """A training backend whose clients send fixed updates with known record counts."""

    def __init__(self, num_examples: Sequence[int]) -> None:
        self.num_examples = num_examples

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        return RoundOutcome(
            tuple(ClientUpdate(cid, torch.full((2,), 0.5), num_examples=self.num_examples[i])
                  for i, cid in enumerate(clients)),
            (),
        )


def _weight_forger(total_weight: int) -> type[SecureClient]:
    class WeightForger(SecureClient):
        """Client 0 shifts the weight slot so the summed weight becomes ``total_weight``
        (it knows the others' weights, the strongest case)."""

        honest_total = 0

        def masked_input(self, delivery: ShareDelivery, update: np.ndarray, weight: int) -> MaskedInput:
            message = super().masked_input(delivery, update, weight)
            if self.index != 0:
                return message
            return _shifted(message, self.setup.vector_length, total_weight - WeightForger.honest_total, self.setup)

    return WeightForger


@pytest.mark.parametrize("total_weight", [0, 1], ids=["zero-division", "amplified-mean"])
def test_the_secure_backend_skips_a_round_with_a_forged_weight(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, total_weight: int
) -> None:
    counts = [500, 700, 900, 300]
    forger = _weight_forger(total_weight)
    forger.honest_total = sum(counts)
    monkeypatch.setattr("fedtrain.transport.in_process.SecureClient", forger)
    backend = InProcessSecureAggregation(_Fixed(counts), _settings(max_weight=1000), seed=0, weighted=True)
    ids = ("a", "b", "c", "d")
    task = TrainTask.of(ClientConfig(), RoundPlan(ids), ClientPrivacy())

    with caplog.at_level(logging.WARNING, logger="fedtrain.secure.round"):
        outcome = backend.train_round(1, ids, task, torch.zeros(2))

    assert outcome.updates == ()
    assert {f.client_id for f in outcome.failures} == set(ids)
    assert all("summed weight" in f.reason for f in outcome.failures)
    assert "secure aggregation aborted" in caplog.text


def test_a_huge_record_count_never_reaches_floating_point() -> None:
    backend = InProcessSecureAggregation(_Fixed([10**400, 3, 5]), _settings(max_weight=1000), seed=0, weighted=True)
    ids = ("a", "b", "c")
    task = TrainTask.of(ClientConfig(), RoundPlan(ids), ClientPrivacy())

    outcome = backend.train_round(1, ids, task, torch.zeros(2))

    (aggregate,) = outcome.updates
    refused = {f.client_id: f.reason for f in outcome.failures}
    assert aggregate.client_id == "secure-aggregate"
    assert torch.allclose(aggregate.vector, torch.full((2,), 0.5), atol=1e-6)
    if "a" in refused:  # refused by the update validation before masking
        assert "num_examples" in refused["a"]
        assert (aggregate.num_examples, aggregate.contributors) == (3 + 5, 2)
    else:  # or weighted as the integer min(num_examples, max_weight)
        assert (aggregate.num_examples, aggregate.contributors) == (1000 + 3 + 5, 3)


def _amplifier() -> type[SecureClient]:
    class Amplifier(SecureClient):
        """Client 0 adds 2^30 to the weight slot: far past any honest summed weight."""

        def masked_input(self, delivery: ShareDelivery, update: np.ndarray, weight: int) -> MaskedInput:
            message = super().masked_input(delivery, update, weight)
            return _shifted(message, self.setup.vector_length, 1 << 30, self.setup) if self.index == 0 else message

    return Amplifier


def test_a_forged_weight_in_a_simulation_skips_every_round_with_the_model_unchanged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("fedtrain.transport.in_process.SecureClient", _amplifier())
    base = SECURE + ["data.num_clients=6", "strategy.clients_per_round=6"]

    one = simulate(config.load(None, base + ["run.rounds=1"]), out_dir=tmp_path / "one")
    two = simulate(config.load(None, base + ["run.rounds=2"]), out_dir=tmp_path / "two")

    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["num_clients"], r["num_failed"]) for r in rows] == [(0, 6), (0, 6)]
    assert len({r.accuracy for r in one.records + two.records}) == 1
    assert torch.equal(one.params, two.params)
