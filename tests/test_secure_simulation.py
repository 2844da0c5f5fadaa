"""Secure aggregation through the engine: same accuracy as plain FedAvg,
strategies that need single updates refused, ring overflow refused at config
time, aborted rounds skipped, distributed DP accounted with its dropouts."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch

from fedtrain import config
from fedtrain.transport.in_process import InProcessSecureAggregation
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig, ConfigError
from fedtrain.types import ClientFailure, RoundOutcome
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.distributed import DistributedDP
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.secure.setting import SecureSettings
from fedtrain.simulation import simulate
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientUpdate, RoundPlan

SECURE = ["secure.aggregation=true"]


def test_digits_with_secure_aggregation_reaches_the_accuracy_of_plain_fedavg() -> None:
    rounds = ["run.rounds=20"]

    plain = simulate(config.load(None, rounds))
    secure = simulate(config.load(None, rounds + SECURE))

    print(f"plain {plain.summary.final_accuracy:.4f}, secure {secure.summary.final_accuracy:.4f}")
    assert plain.summary.final_accuracy > 0.85
    assert abs(secure.summary.final_accuracy - plain.summary.final_accuracy) <= 0.01
    assert all(r.num_clients == 10 and r.num_failed == 0 for r in secure.records)
    assert torch.allclose(secure.params, plain.params, atol=1e-4)


@pytest.mark.parametrize("strategy", ["fedmedian", "krum", "multi_krum", "trimmed_mean"])
def test_strategies_that_need_individual_updates_are_refused(strategy: str) -> None:
    cfg = config.load(None, SECURE + [f"strategy.name={strategy}"])

    with pytest.raises(ConfigError, match=rf"strategy.name = '{strategy}'.*reveals only their sum"):
        simulate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["secure.bits=16", "secure.max_weight=4000"],
         r"secure.max_weight = 4000: .* allowed: secure.max_weight <= 3276"),
        (["secure.bits=16", "data.num_clients=40", "strategy.clients_per_round=40", "secure.max_weight=10"],
         r"secure.bits = 16: .* 819 quantisation levels, fewer than 1024; allowed: secure.bits >= 17"),
        (["strategy.sampling=poisson", "data.num_clients=3000000", "strategy.clients_per_round=10"],
         r"secure.max_weight = 1000: up to 3000000 clients per round \(num_clients, under Poisson sampling\)"),
    ],
)
def test_a_ring_that_could_overflow_is_refused_before_the_run(overrides: list[str], message: str) -> None:
    from fedtrain.run import build_strategy

    for deployed in (False, True):
        with pytest.raises(ConfigError, match=message):
            build_strategy(config.load(None, SECURE + overrides), deployed)


def test_privacy_modes_that_do_not_fit_secure_aggregation_are_refused() -> None:
    with pytest.raises(ConfigError, match="privacy.mode = 'distributed' with secure.aggregation = false"):
        config.load(None, ["privacy.mode=distributed", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="privacy.mode = 'user' with secure.aggregation = true"):
        config.load(None, SECURE + ["privacy.mode=user", "privacy.noise_multiplier=1.0"])


def test_dropouts_are_recovered_and_too_many_skip_the_round_with_the_model_unchanged() -> None:
    base = ["run.rounds=6", "strategy.clients_per_round=10"]

    some = simulate(config.load(None, base + SECURE + ["secure.simulated_dropout=0.1"]))
    most = simulate(config.load(None, base + SECURE + ["secure.simulated_dropout=0.9"]))

    assert any(0 < r.num_clients < 10 for r in some.records)
    assert all(r.num_clients + r.num_failed == 10 for r in some.records)
    assert all(r.num_clients == 0 and r.num_failed == 10 for r in most.records)
    assert len({r.accuracy for r in most.records}) == 1


class FixedUpdates:
    """A training backend whose clients send fixed vectors (one sends NaN)."""

    def __init__(self, vectors: dict[str, torch.Tensor]) -> None:
        self.vectors = vectors

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        updates = tuple(ClientUpdate(cid, self.vectors[cid], num_examples=2 + i) for i, cid in enumerate(clients))
        return RoundOutcome(updates, (ClientFailure("crashed", "RuntimeError: boom"),))


def test_secure_backend_returns_only_the_weighted_mean_and_excludes_a_bad_update() -> None:
    vectors = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([float("nan"), 0.0]),
               "d": torch.tensor([1.0, 1.0])}
    settings = SecureSettings(bits=32, clip_range=4.0, max_weight=100, neighbours=0, threshold=0.5,
                              simulated_dropout=0.0)
    backend = InProcessSecureAggregation(FixedUpdates(vectors), settings, seed=0, weighted=True)
    task = TrainTask.of(ClientConfig(), RoundPlan(tuple(vectors)), ClientPrivacy())

    outcome = backend.train_round(1, tuple(vectors), task, torch.zeros(2))

    (aggregate,) = outcome.updates
    expected = (2 * vectors["a"] + 3 * vectors["b"] + 5 * vectors["d"]) / 10
    assert isinstance(aggregate, AggregateUpdate) and aggregate.origin is AggregateOrigin.SECURE_SUM
    assert aggregate.client_id == "secure-aggregate" and not aggregate.unit_weights
    assert (aggregate.num_examples, aggregate.contributors) == (10, 3)
    assert torch.allclose(aggregate.vector, expected, atol=1e-6)
    assert {f.client_id for f in outcome.failures} == {"crashed", "c"}


def test_distributed_dp_accounts_the_noise_that_reached_the_sum() -> None:
    def policy() -> DistributedDP:
        return DistributedDP(Accountant(), noise_multiplier=1.0, clip=0.5, sample_rate=0.1, amplified=True,
                             expected_cohort=10.0, delta=1e-5, max_epsilon=0.0)

    full, short = policy(), policy()
    cohort = [str(i) for i in range(10)]
    mean = torch.full((3,), 0.2)

    def secure_sum(contributors: int) -> AggregateUpdate:
        return AggregateUpdate(mean, num_examples=contributors, contributors=contributors,
                               origin=AggregateOrigin.SECURE_SUM, unit_weights=True)

    released = full.release(1, cohort, [secure_sum(10)])
    short.release(1, cohort, [secure_sum(6)])

    assert torch.allclose(released.updates[0].vector, mean * 10 / 10.0)
    assert released.updates[0].client_id == "distributed-dp"
    assert full.accountant.history[0].noise_multiplier == pytest.approx(1.0)
    assert short.accountant.history[0].noise_multiplier == pytest.approx(math.sqrt(0.6))
    assert short.report().epsilon > full.report().epsilon
    assert full.client_privacy(1).distributed_noise == pytest.approx(0.5)


def test_distributed_dp_simulation_runs_with_client_noise_and_reports_epsilon() -> None:
    cfg = config.load(None, SECURE + [
        "run.rounds=3", "privacy.mode=distributed", "privacy.noise_multiplier=1.0", "privacy.clip=0.5",
        "secure.simulated_dropout=0.2",
    ])

    result = simulate(cfg)

    assert result.summary.epsilon is not None and result.summary.epsilon > 0
    assert all(r.privacy["effective_noise_multiplier"] <= 1.0 for r in result.records)
    assert any(r.privacy["effective_noise_multiplier"] < 1.0 for r in result.records if r.num_clients)
