"""A run's privacy setting, built from its config and checked before training.

Noise calibration happens here, up front: with ``privacy.target_epsilon`` the
noise multiplier is the smallest one whose ε after all ``run.rounds`` stays
within the target for each client, calibrated from its own record count
(sample level, :func:`fedtrain.privacy.sample_level.calibrate_client_noise`),
or for the population (user level).
"""

from __future__ import annotations

import logging
from typing import Mapping

from fedtrain.config import AccountantKind, Config, ConfigError, GradSampleMode, PrivacyMode, Sampling
from fedtrain.privacy.policy import NoPrivacy, PrivacyPolicy
from fedtrain.strategy import Strategy

log = logging.getLogger(__name__)


def _calibrate(
    target: float, delta: float, kind: AccountantKind, rate: float, steps: int
) -> float:
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
) -> PrivacyPolicy:
    """The privacy policy of ``config`` (everything checked, noise calibrated).

    ``grad_sample_mode`` is the Opacus mode resolved for the model (see
    :func:`fedtrain.privacy.dpsgd.choose_mode`); only sample level uses it.
    """
    p = config.privacy
    if p.mode is PrivacyMode.NONE:
        return NoPrivacy()
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

        if strategy.needs_individual_updates:
            raise ConfigError(
                f"strategy.name = {config.strategy.name!r} with privacy.mode = 'user': the strategy looks at "
                "each update on its own, but user-level DP releases only their noisy mean; use fedavg, "
                "fedavgm, fedadam, fedyogi, fedadagrad, fedprox or fedsgd (a strategy of yours that uses only "
                "the updates' mean declares needs_individual_updates = False)"
            )
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
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    from fedtrain.privacy.sample_level import SampleLevelDP

    if grad_sample_mode is GradSampleMode.AUTO:
        raise ValueError("build_policy needs a resolved grad_sample_mode (see dpsgd.choose_mode)")
    return SampleLevelDP.of(config, client_sizes, grad_sample_mode)
