"""Privacy you can check (issue 19): every guarantee is checked on the noise
actually used, the budget holds in the worst case a round can release, one
validation of the whole run, and the PLD accountant end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtrain import config
from fedtrain.cli import main
from fedtrain.config import AccountantKind, ConfigError, GradSampleMode
from fedtrain.deploy.server import check_secure_deployment
from fedtrain.privacy.accountant import Accountant, epsilon_for
from fedtrain.privacy.distributed import DistributedDP
from fedtrain.privacy.setting import build_policy, strategies_for_a_sum, user_level_noise
from fedtrain.run import build_strategy
from fedtrain.secure.setting import SecureSettings
from fedtrain.simulation import simulate
from fedtrain.strategy import BUILTIN_STRATEGIES, load_strategy
from fedtrain.types import AggregateOrigin, AggregateUpdate

ROOT = Path(__file__).resolve().parent.parent

# The reproduction: a 18-bit ring over 20 clients rounds a sum by up to 0.0122.
SMALL_RING = [
    "data.num_clients=20", "strategy.clients_per_round=20", "privacy.mode=distributed", "privacy.clip=0.3",
    "secure.aggregation=true", "secure.bits=18", "run.rounds=2",
]


@pytest.mark.parametrize("deployed", [False, True])
def test_rounding_guard_runs_on_the_noise_calibrated_from_target_epsilon(deployed: bool) -> None:
    cfg = config.load(None, SMALL_RING + ["privacy.target_epsilon=8"])
    z = user_level_noise(cfg)

    with pytest.raises(ConfigError, match=r"secure.bits = 18: the rounding error .* 0\.0122, .*calibrated from "
                                          r"privacy.target_epsilon = 8.0"):
        build_strategy(cfg, deployed)
    assert f"{z * 0.3:.3g}" in str(_refusal(cfg))


def _refusal(cfg: config.Config) -> ConfigError:
    try:
        build_strategy(cfg)
    except ConfigError as exc:
        return exc
    raise AssertionError("accepted")


def test_rounding_guard_accepts_a_ring_fine_enough_for_the_calibrated_noise() -> None:
    cfg = config.load(None, SMALL_RING + ["privacy.target_epsilon=8", "secure.bits=26"])

    _, plan = build_strategy(cfg)

    assert plan is not None and plan.settings.bits == 26


def _dp_configs() -> list[Path]:
    return sorted(
        p for p in (ROOT / "simulations").glob("*.toml")
        if config.load(p).privacy.mode is not config.PrivacyMode.NONE
    )


@pytest.mark.parametrize("path", _dp_configs(), ids=lambda p: p.stem)
def test_every_shipped_dp_config_passes_validation_with_its_calibrated_noise(path: Path) -> None:
    cfg = config.load(path)

    strategy, plan = build_strategy(cfg)

    assert (plan is not None) == cfg.secure.aggregation
    assert not strategy.needs_individual_updates


def test_adaptive_clipping_count_noise_is_checked_against_the_calibrated_noise() -> None:
    cfg = config.load(None, [
        "privacy.mode=user", "privacy.target_epsilon=8", "privacy.adaptive_clip=true",
        "privacy.clipped_count_stddev=0.5", "run.rounds=20",
    ])
    z = user_level_noise(cfg)
    assert z / 2 > 0.5

    with pytest.raises(ConfigError, match=rf"clipped_count_stddev = 0.5: must exceed noise_multiplier / 2 = "
                                          rf"{z / 2:.4g}"):
        build_policy(cfg, load_strategy("fedavg"), {}, 4.0, GradSampleMode.EW)


def test_a_deployment_refuses_an_unreachable_target_before_anything_starts() -> None:
    cfg = config.load(None, [
        "privacy.mode=distributed", "secure.aggregation=true", "privacy.target_epsilon=0.001", "run.rounds=100",
    ])

    with pytest.raises(ConfigError, match="privacy.target_epsilon = 0.001"):
        check_secure_deployment(cfg)


# --- the budget holds in the worst case -------------------------------------------------------

def _secure_sum(contributors: int) -> AggregateUpdate:
    import torch

    return AggregateUpdate(torch.zeros(2), num_examples=contributors, contributors=contributors,
                           origin=AggregateOrigin.SECURE_SUM, unit_weights=True)


def _policy(max_epsilon: float, fewest: object) -> DistributedDP:
    return DistributedDP(Accountant(AccountantKind.RDP), noise_multiplier=6.0, clip=1.0, sample_rate=1.0,
                         amplified=False, expected_cohort=10.0, delta=1e-5, max_epsilon=max_epsilon,
                         fewest_contributors=fewest)  # type: ignore[arg-type]


def _run_at_the_threshold(policy: DistributedDP, survivors: int, rounds: int) -> float:
    cohort = [str(i) for i in range(10)]
    for rnd in range(1, rounds + 1):
        if policy.check(rnd, cohort) is not None:
            break
        policy.release(rnd, cohort, [_secure_sum(survivors)])
    return policy.accountant.epsilon(1e-5)


def test_a_round_at_the_threshold_can_no_longer_end_above_max_epsilon() -> None:
    settings = SecureSettings.of(config.load(None, ["secure.aggregation=true", "strategy.clients_per_round=10"]))
    threshold = settings.fewest_contributors(10)
    assert threshold == 5

    checked = _run_at_the_threshold(_policy(3.5, settings.fewest_contributors), threshold, 50)
    planned_only = _run_at_the_threshold(_policy(3.5, lambda n: n), threshold, 50)

    assert 0 < checked <= 3.5
    assert planned_only > 3.5  # the old check, with the planned noise, let the last round overshoot


def test_without_a_survivor_bound_the_policy_assumes_one_contributor() -> None:
    policy = DistributedDP(Accountant(AccountantKind.RDP), noise_multiplier=6.0, clip=1.0, sample_rate=1.0,
                           amplified=False, expected_cohort=10.0, delta=1e-5, max_epsilon=3.0)

    assert policy.worst_case_event(10).noise_multiplier == pytest.approx(3.0 * math.sqrt(1 / 10))


DROPOUTS = [
    "data.num_clients=20", "strategy.clients_per_round=10", "privacy.mode=distributed",
    "privacy.noise_multiplier=6.0", "secure.aggregation=true", "secure.simulated_dropout=0.4",
    "run.rounds=12", "privacy.max_epsilon=3.0", "privacy.secure_noise=false",
]


def test_simulated_dropouts_down_to_the_threshold_keep_epsilon_within_max_epsilon() -> None:
    cfg = config.load(None, DROPOUTS)
    fewest = SecureSettings.of(cfg).fewest_contributors(10)

    result = simulate(cfg)

    released = [r.num_clients for r in result.records if r.num_clients]
    assert min(released) == fewest + 1  # the fewest survivors the protocol releases a sum of
    assert all(r.epsilon is not None and r.epsilon <= 3.0 for r in result.records)
    assert result.summary.epsilon is not None and result.summary.epsilon <= 3.0
    assert result.summary.stopped_early is not None
    # The round it stopped before fits the budget with the planned noise, not in the worst case:
    history = Accountant(AccountantKind.RDP)
    for r in result.records:
        if r.num_clients:
            history.compose(GaussianEventAt(6.0 * math.sqrt(r.num_clients / 10)))
    assert history.epsilon_if(GaussianEventAt(6.0), 1e-5) <= 3.0 < history.epsilon_if(
        GaussianEventAt(6.0 * math.sqrt(fewest / 10)), 1e-5)


def GaussianEventAt(z: float):  # type: ignore[no-untyped-def]
    """Uniform sampling's round event: ``(z/2, q = 1)`` (fedtrain.privacy.user_level)."""
    from fedtrain.privacy.user_level import round_event

    return round_event(z, 1.0, amplified=False)


# --- one validation -----------------------------------------------------------------------------

def test_the_strategies_allowed_on_a_sum_come_from_the_builtins_own_declarations() -> None:
    expected = {n for n in BUILTIN_STRATEGIES if not load_strategy(n).needs_individual_updates}

    assert set(strategies_for_a_sum()) == expected
    assert {"fedmedian", "krum", "multi_krum", "trimmed_mean"}.isdisjoint(expected)


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["secure.aggregation=true"], "with secure.aggregation = true"),
        (["privacy.mode=user", "privacy.noise_multiplier=1"], "with privacy.mode = 'user'"),
        (["privacy.mode=distributed", "secure.aggregation=true", "privacy.noise_multiplier=1"],
         "with secure.aggregation = true"),
    ],
)
@pytest.mark.parametrize("deployed", [False, True])
def test_one_validation_refuses_a_strategy_that_needs_each_update_in_simulation_and_deployment(
    overrides: list[str], setting: str, deployed: bool
) -> None:
    cfg = config.load(None, overrides + ["strategy.name=krum"])

    with pytest.raises(ConfigError) as refused:
        build_strategy(cfg, deployed)

    message = str(refused.value)
    assert message.startswith(f"strategy.name = 'krum' {setting}")
    assert f"allowed: {', '.join(strategies_for_a_sum())} (" in message


# --- PLD end to end -----------------------------------------------------------------------------

def test_pld_accountant_in_a_run_and_in_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dp_accounting")
    cfg = config.load(None, [
        "privacy.mode=user", "privacy.noise_multiplier=1.0", "privacy.accountant=pld", "strategy.sampling=poisson",
        "run.rounds=2", "client.epochs=1",
    ])

    result = simulate(cfg)
    code = main(["privacy", "--sample-rate", "0.25", "--steps", "2", "--delta", "1e-5",
                 "--noise-multiplier", "1.0", "--accountant", "pld"])

    rate = cfg.strategy.clients_per_round / cfg.data.num_clients
    pld = epsilon_for(1.0, rate, 2, 1e-5, AccountantKind.PLD)
    assert result.summary.epsilon == pytest.approx(pld)
    assert pld < epsilon_for(1.0, rate, 2, 1e-5, AccountantKind.RDP)
    out = capsys.readouterr().out
    assert code == 0 and "(pld)" in out
    assert f"ε = {epsilon_for(1.0, 0.25, 2, 1e-5, AccountantKind.PLD):.4f}" in out


def test_a_distributed_dp_round_that_lost_too_many_clients_before_masking_is_skipped() -> None:
    import torch

    from fedtrain import config as cfg
    from fedtrain.secure.round import run_secure_round
    from fedtrain.secure.setting import SecureSettings
    from fedtrain.types import UpdateKind

    settings = SecureSettings.of(cfg.load(None, [
        "data.num_clients=20", "strategy.clients_per_round=20", "secure.aggregation=true",
        "privacy.mode=distributed", "privacy.noise_multiplier=1.0", "privacy.clip=0.3", "secure.bits=40",
    ]))
    survivors = next(k for k in range(19, 1, -1) if settings.fewest_contributors(k) < settings.fewest_contributors(20))
    ids = [str(i) for i in range(survivors)]

    result = run_secure_round(None, settings, rnd=1, ids=ids, planned=20,  # type: ignore[arg-type]
                              params=torch.zeros(4), kind=UpdateKind.DELTA, distributed_noise=0.3, weighted=False)

    assert result.aggregate is None
    assert [f.client_id for f in result.failures] == ids
    assert all("too few clients" in f.reason for f in result.failures)
