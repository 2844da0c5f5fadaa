"""A run's privacy setting, built from its config and checked before training.

Noise calibration happens here, up front: with ``privacy.target_epsilon`` the
noise multiplier is the smallest one whose ε after all ``run.rounds`` stays
within the target for each client, calibrated from its own record count
(sample level, :func:`fedtrain.privacy.sample_level.calibrate_client_noise`),
or for the population (user level).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

from fedtrain.config import AccountantKind, Config, ConfigError, GradSampleMode, PrivacyMode, Sampling
from fedtrain.plugin import load_object
from fedtrain.privacy.policy import NoPrivacy, PrivacyPolicy
from fedtrain.strategy import BUILTIN_STRATEGIES, Strategy

log = logging.getLogger(__name__)


@functools.cache
def strategies_for_a_sum() -> tuple[str, ...]:
    """The built-in strategies (:data:`fedtrain.strategy.BUILTIN_STRATEGIES`)
    whose class declares ``needs_individual_updates = False``: those that work
    on the updates' sum or mean alone, and so under secure aggregation and
    user-level DP."""
    names = []
    for name, spec in BUILTIN_STRATEGIES.items():
        cls = load_object(spec, "strategy class", "strategy.name")
        if not getattr(cls, "needs_individual_updates", True):
            names.append(name)
    return tuple(names)


def check_strategy(config: Config, strategy: Strategy) -> None:
    """Refuse a strategy that needs each update on its own where the run
    reveals only their sum (``secure.aggregation``) or a noisy mean
    (``privacy.mode = 'user'``); the allowed names come from the built-ins'
    own ``needs_individual_updates``."""
    if not strategy.needs_individual_updates:
        return
    if config.secure.aggregation:
        setting = "with secure.aggregation = true"
        why = "each client's update on its own (needs_individual_updates), but secure aggregation reveals only their sum"
    elif config.privacy.mode is PrivacyMode.USER:
        setting = "with privacy.mode = 'user'"
        why = "each update on its own, but user-level DP releases only their noisy mean"
    else:
        return
    raise ConfigError(
        f"strategy.name = {config.strategy.name!r} {setting}: the strategy looks at {why}; "
        f"allowed: {', '.join(strategies_for_a_sum())} (a strategy of yours that uses only the updates' mean "
        "declares needs_individual_updates = False)"
    )


def _calibrate(
    target: float, delta: float, kind: AccountantKind, rate: float, steps: int
) -> float:
    return _calibrated(float(target), float(delta), kind, float(rate), int(steps))


@functools.lru_cache(maxsize=64)
def _calibrated(target: float, delta: float, kind: AccountantKind, rate: float, steps: int) -> float:
    """:func:`_calibrate`, cached: validation and the policy ask for the same noise."""
    from fedtrain.privacy.accountant import calibrate_noise

    try:
        return calibrate_noise(target, delta, rate, steps, kind)
    except ValueError as exc:
        raise ConfigError(
            f"privacy.target_epsilon = {target}: cannot be reached with sample rate {rate:.4g} over "
            f"{steps} steps at δ = {delta} ({exc})"
        ) from exc


def user_level_noise(config: Config) -> float:
    """The total noise multiplier ``z`` of DP-FedAvg: configured or calibrated.

    Without Poisson sampling a round is accounted as ``(z/2, q = 1)`` (see
    :mod:`fedtrain.privacy.user_level`), so the calibrated value is doubled.
    """
    p = config.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    rounds = config.run.rounds
    if config.strategy.sampling is Sampling.POISSON:
        rate = config.strategy.clients_per_round / config.data.num_clients
        return _calibrate(p.target_epsilon, p.delta, p.accountant, rate, rounds)
    return 2.0 * _calibrate(p.target_epsilon, p.delta, p.accountant, 1.0, rounds)


def build_policy(
    config: Config,
    strategy: Strategy,
    client_sizes: Mapping[str, int],
    expected_cohort: float,
    grad_sample_mode: GradSampleMode,
    fewest_contributors: Callable[[int], int] | None = None,
) -> PrivacyPolicy:
    """The privacy policy of ``config``, noise calibrated; the run was
    validated first (``fedtrain.run.validate_run``, which calls
    :func:`check_strategy`).

    ``grad_sample_mode`` is the Opacus mode resolved for the model (see
    :func:`fedtrain.privacy.dpsgd.choose_mode`); only sample level uses it.
    ``fewest_contributors`` (distributed DP) maps a round's cohort size to the
    fewest noise shares a released sum can hold (secure aggregation's
    :meth:`~fedtrain.secure.setting.SecureSettings.fewest_contributors`); the
    budget is checked against that worst case. Without it one share is assumed.
    """
    p = config.privacy
    if p.mode is PrivacyMode.NONE:
        return NoPrivacy()
    check_delta(config, client_sizes)
    from fedtrain.privacy.accountant import Accountant
    from fedtrain.privacy.noise import noise_source

    if not p.secure_noise:
        log.warning(
            "privacy.secure_noise = false: DP noise, the cohort and DP-SGD's batches come from generators "
            "seeded by run.seed = %d, which config.toml and summary.json publish: the noise protects nothing, "
            "and the reported ε assumes the seed is secret (amplification by sampling needs a secret sample); "
            "for reproducible experiments only",
            config.run.seed,
        )
    if p.mode is PrivacyMode.USER:
        from fedtrain.privacy.user_level import AdaptiveClipping, UserLevelDP

        if config.strategy.sampling is not Sampling.POISSON:
            log.warning(
                "privacy.mode = 'user' with strategy.sampling = 'uniform': accounted without amplification "
                "by sampling (noise multiplier halved, q = 1); use 'poisson' for a much smaller ε"
            )
        noise_multiplier = user_level_noise(config)
        adaptive = None
        if p.adaptive_clip:
            stddev = p.clipped_count_stddev or max(expected_cohort / 20.0, noise_multiplier)
            adaptive = AdaptiveClipping(p.target_quantile, p.clip_lr, stddev)
        try:
            return UserLevelDP(
                accountant=Accountant(p.accountant),
                noise_multiplier=noise_multiplier,
                clip=p.clip,
                sample_rate=config.strategy.clients_per_round / config.data.num_clients,
                amplified=config.strategy.sampling is Sampling.POISSON,
                expected_cohort=expected_cohort,
                delta=p.delta,
                max_epsilon=p.max_epsilon,
                noise=noise_source(p.secure_noise, config.run.seed),
                adaptive=adaptive,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if p.mode is PrivacyMode.DISTRIBUTED:
        from fedtrain.privacy.distributed import DistributedDP

        try:
            return DistributedDP(
                accountant=Accountant(p.accountant),
                noise_multiplier=user_level_noise(config),
                clip=p.clip,
                sample_rate=config.strategy.clients_per_round / config.data.num_clients,
                amplified=config.strategy.sampling is Sampling.POISSON,
                expected_cohort=expected_cohort,
                delta=p.delta,
                max_epsilon=p.max_epsilon,
                fewest_contributors=fewest_contributors,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    from fedtrain.privacy.sample_level import SampleLevelDP

    if grad_sample_mode is GradSampleMode.AUTO:
        raise ValueError("build_policy needs a resolved grad_sample_mode (see dpsgd.choose_mode)")
    return SampleLevelDP.of(config, client_sizes, grad_sample_mode)


# ------------------------------------------------ δ against the size of what is protected


def protected_units(config: Config, client_sizes: Mapping[str, int]) -> tuple[int, str]:
    """``N`` of the rule δ < 1/N, and what it counts: under sample-level DP
    each client accounts for its own records, so the records of the smallest
    client that trains (``privacy.min_records`` or more); under user-level
    and distributed DP the clients (``data.num_clients``)."""
    if config.privacy.mode is PrivacyMode.SAMPLE:
        trained = [n for n in client_sizes.values() if n >= config.privacy.min_records]
        return (min(trained) if trained else 0), "records of the smallest client that trains"
    return config.data.num_clients, "clients (data.num_clients)"


def check_delta(config: Config, client_sizes: Mapping[str, int]) -> None:
    """Refuse ``privacy.delta >= 1/N``. An (ε, δ)-DP mechanism may publish
    each protected unit in full with probability δ, so with δ ≥ 1/N it may
    publish one of the N whole: Dwork & Roth 2014 ("The Algorithmic
    Foundations of Differential Privacy", §2.3) call values of δ on the
    order of 1/N "very dangerous" and ask for δ well below 1/N (the DP-SGD
    literature uses δ ≤ 1/N^1.1 or 1e-5). A run with no private mode, or
    with no client that trains, has nothing to check."""
    p = config.privacy
    if p.mode is PrivacyMode.NONE:
        return
    n, what = protected_units(config, client_sizes)
    if n > 0 and p.delta >= 1.0 / n:
        raise ConfigError(
            f"privacy.delta = {p.delta:g} with privacy.mode = {p.mode.value!r}: must be < 1/N = {1.0 / n:.3g}, "
            f"N = {n} {what}; a δ of 1/N or more lets the mechanism publish one of them whole "
            "(Dwork & Roth 2014, §2.3); allowed: well below 1/N, e.g. 1e-5"
        )
