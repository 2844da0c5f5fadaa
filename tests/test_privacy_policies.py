"""User-level (DP-FedAvg), distributed and sample-level (DP-SGD ledger) policies, as units."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrain import ClientUpdate
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientMetric
from fedtrain.config import AccountantKind, GradSampleMode
from fedtrain.privacy.accountant import Accountant, epsilon_for
from fedtrain.privacy.distributed import DistributedDP
from fedtrain.privacy.dpsgd import DpSgdTask, client_event
from fedtrain.privacy.noise import SeededGaussian
from fedtrain.privacy.sample_level import SampleLevelDP
from fedtrain.privacy.user_level import (
    AdaptiveClipping,
    UserLevelDP,
    round_event,
    update_noise_multiplier,
)


def _user(noise: float = 1.0, clip: float = 1.0, max_epsilon: float = 0.0,
          adaptive: AdaptiveClipping | None = None, cohort: float = 4.0) -> UserLevelDP:
    return UserLevelDP(
        accountant=Accountant(AccountantKind.RDP), noise_multiplier=noise, clip=clip,
        sample_rate=0.1, amplified=True, expected_cohort=cohort, delta=1e-5,
        max_epsilon=max_epsilon, noise=SeededGaussian(0), adaptive=adaptive,
    )


def _update(cid: str, vector: list[float], unclipped: float = 1.0) -> ClientUpdate:
    return ClientUpdate(cid, torch.tensor(vector), num_examples=5, metrics={ClientMetric.UNCLIPPED.value: unclipped})


def test_release_is_the_noisy_sum_over_the_expected_cohort() -> None:
    policy = _user(noise=0.5, cohort=4.0)
    updates = [_update("a", [0.6, 0.8]), _update("b", [0.0, 1.0])]
    reference = SeededGaussian(0).gaussian(2, 0.5, torch.device("cpu"))

    release = policy.release(1, ["a", "b"], updates)

    (noisy,) = release.updates
    assert torch.allclose(noisy.vector, (torch.tensor([0.6, 1.8]) + reference) / 4.0)
    assert release.rejected == ()


def test_release_charges_the_ledger_before_returning() -> None:
    policy = _user(noise=1.0)

    policy.release(1, ["a"], [_update("a", [0.1, 0.1])])
    policy.release(2, [], [])

    assert policy.accountant.history[0].steps == 2
    assert policy.report().epsilon == pytest.approx(epsilon_for(1.0, 0.1, 2, 1e-5, AccountantKind.RDP))


def test_releases_are_typed_aggregates_named_by_their_origin() -> None:
    (user,) = _user().release(1, ["a"], [_update("a", [0.1, 0.1])]).updates
    (distributed,) = _distributed().release(1, ["a", "b"], [_secure_sum(2)]).updates

    assert isinstance(user, AggregateUpdate) and user.origin is AggregateOrigin.DP_FEDAVG
    assert user.client_id == "dp-fedavg"
    assert isinstance(distributed, AggregateUpdate) and distributed.origin is AggregateOrigin.DISTRIBUTED_DP
    assert (distributed.client_id, distributed.num_examples, distributed.contributors) == ("distributed-dp", 1, 2)


def _distributed() -> DistributedDP:
    return DistributedDP(Accountant(AccountantKind.RDP), noise_multiplier=1.0, clip=1.0, sample_rate=0.1,
                         amplified=True, expected_cohort=2.0, delta=1e-5, max_epsilon=0.0)


def _secure_sum(contributors: int, unit_weights: bool = True, weight: int | None = None) -> AggregateUpdate:
    return AggregateUpdate(torch.full((2,), 0.1), num_examples=contributors if weight is None else weight,
                           contributors=contributors, origin=AggregateOrigin.SECURE_SUM, unit_weights=unit_weights)


UNIT_WEIGHT_REFUSAL = "distributed DP releases only a securely aggregated sum of unit-weight contributions"


@pytest.mark.parametrize(
    "update",
    [
        ClientUpdate("secure-aggregate", torch.full((2,), 0.1), num_examples=2, contributors=2),
        ClientUpdate("a", torch.full((2,), 0.1), num_examples=1),
        _secure_sum(2, unit_weights=False, weight=7),
        AggregateUpdate(torch.full((2,), 0.1), num_examples=1, contributors=2, origin=AggregateOrigin.DP_FEDAVG),
    ],
    ids=["plain-update-whose-counts-match", "client-update", "weighted-secure-sum", "other-origin"],
)
def test_distributed_dp_refuses_anything_but_a_unit_weight_secure_sum(update: ClientUpdate) -> None:
    policy = _distributed()

    release = policy.release(1, ["a", "b"], [update])

    assert release.updates == () and release.events == {}
    assert release.rejected == ((update.client_id, UNIT_WEIGHT_REFUSAL),)
    assert not policy.accountant.history


def test_distributed_dp_refuses_two_secure_sums_in_one_round() -> None:
    release = _distributed().release(1, ["a", "b"], [_secure_sum(1), _secure_sum(1)])

    assert release.updates == ()
    assert release.rejected == (("secure-aggregate", "expected exactly one secure aggregate per round"),) * 2


def test_a_unit_weight_aggregate_must_count_each_contributor_once() -> None:
    with pytest.raises(ValueError, match="num_examples = 3 with unit_weights: must equal contributors = 2"):
        _secure_sum(2, weight=3)


def test_update_above_the_clip_bound_is_rejected() -> None:
    policy = _user(clip=1.0)

    release = policy.release(1, ["a", "b"], [_update("a", [3.0, 4.0]), _update("b", [0.1, 0.0])])

    assert [cid for cid, _ in release.rejected] == ["a"]
    assert "exceeds privacy.clip" in release.rejected[0][1]


def test_budget_check_refuses_the_round_that_would_exceed_it() -> None:
    one_round = epsilon_for(1.0, 0.1, 1, 1e-5, AccountantKind.RDP)
    two_rounds = epsilon_for(1.0, 0.1, 2, 1e-5, AccountantKind.RDP)
    policy = _user(noise=1.0, max_epsilon=(one_round + two_rounds) / 2)

    assert policy.check(1, ["a"]) is None
    policy.release(1, ["a"], [_update("a", [0.1, 0.1])])
    reason = policy.check(2, ["a"])

    assert reason is not None and "privacy.max_epsilon" in reason
    assert policy.report().epsilon <= policy.max_epsilon


def test_uniform_sampling_is_accounted_without_amplification_at_double_sensitivity() -> None:
    event = round_event(2.0, 0.1, amplified=False)

    assert (event.noise_multiplier, event.sample_rate) == (1.0, 1.0)
    assert round_event(2.0, 0.1, amplified=True).sample_rate == 0.1


def test_adaptive_noise_split_composes_to_the_total() -> None:
    z_update = update_noise_multiplier(1.0, 5.0)

    assert z_update**-2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clipped_count_stddev = 0.4"):
        update_noise_multiplier(1.0, 0.4)


def test_adaptive_clip_moves_toward_the_target_quantile() -> None:
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1e-3)
    grows = _user(noise=1e-4, clip=1.0, adaptive=adaptive, cohort=4.0)
    shrinks = _user(noise=1e-4, clip=1.0, adaptive=adaptive, cohort=4.0)
    all_clipped = [_update(c, [1.0, 0.0], unclipped=0.0) for c in "abcd"]
    none_clipped = [_update(c, [0.1, 0.0], unclipped=1.0) for c in "abcd"]

    grows.release(1, list("abcd"), all_clipped)
    shrinks.release(1, list("abcd"), none_clipped)

    assert grows.clip == pytest.approx(math.exp(0.2 * 0.5), rel=1e-3)
    assert shrinks.clip == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-3)


def test_state_dict_round_trip_keeps_ledger_and_clip() -> None:
    policy = _user()
    policy.release(1, ["a"], [_update("a", [0.1, 0.1])])
    policy.clip = 0.7
    restored = _user()

    restored.load_state_dict(policy.state_dict())

    assert restored.clip == 0.7
    assert restored.report().epsilon == policy.report().epsilon


def _sample(max_epsilon: float = 0.0) -> SampleLevelDP:
    task = DpSgdTask(noise_multiplier=1.0, max_grad_norm=1.0, mode=GradSampleMode.HOOKS)
    return SampleLevelDP(AccountantKind.RDP, task, {"small": 40, "big": 400}, batch_size=20,
                         epochs=1, delta=1e-5, max_epsilon=max_epsilon)


def test_sample_level_ledger_composes_each_clients_rounds() -> None:
    policy = _sample()

    policy.release(1, ["small", "big"], [])
    policy.release(2, ["small"], [])

    small = client_event(1.0, 40, 20, 1)
    expected = epsilon_for(1.0, small.sample_rate, 2 * small.steps, 1e-5, AccountantKind.RDP)
    assert policy.ledgers["small"].history[0].steps == 2 * small.steps
    assert policy.report().epsilon == pytest.approx(expected)
    assert policy.ledgers["big"].epsilon(1e-5) < expected


def test_sample_level_budget_names_the_client() -> None:
    first = epsilon_for(1.0, 0.5, 2, 1e-5, AccountantKind.RDP)
    policy = _sample(max_epsilon=first * 1.2)

    policy.release(1, ["small"], [])
    reason = policy.check(2, ["big", "small"])

    assert reason is not None and "client small" in reason
