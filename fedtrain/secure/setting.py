"""A run's secure-aggregation setting, built from its config and checked
before training: the ring must hold every possible sum, finely enough for
distributed DP's noise. (That the strategy works on a sum is checked with the
rest of the run, :func:`fedtrain.privacy.setting.check_strategy`.)
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from fedtrain.config import Config, ConfigError, PrivacyMode, Sampling
from fedtrain.privacy.setting import user_level_noise
from fedtrain.secure.graph import NeighbourGraph, default_degree, threshold_for
from fedtrain.secure.messages import SESSION_BYTES, SecureSetup
from fedtrain.secure.quantize import MIN_LEVELS, Ring

ROUNDING_TO_NOISE = 0.01
"""Under distributed DP, the largest worst-case rounding error of a sum
(``n · step / 2`` per coordinate) allowed, relative to the std ``z·C`` of
its noise. At 1% the discretisation is negligible next to the noise, which is
what justifies adding continuous Gaussian noise before quantising instead of
a discrete Gaussian (Canonne et al. 2020) or Skellam (Agarwal et al. 2021)
mechanism, whose analyses matter only when the ring is too small for that."""


@dataclass(frozen=True)
class SecureSettings:
    """The ``[secure]`` table as the protocol uses it."""

    bits: int
    clip_range: float
    max_weight: int
    neighbours: int
    threshold: float
    simulated_dropout: float

    @classmethod
    def of(cls, config: Config) -> "SecureSettings":
        """The settings of ``config``, refused when its ring could overflow or,
        under distributed DP, round too coarsely for the noise actually used
        (:func:`check_secure`)."""
        check_secure(config)
        s = config.secure
        return cls(s.bits, s.clip_range, s.max_weight, s.neighbours, s.threshold, s.simulated_dropout)

    def fewest_contributors(self, num_clients: int) -> int:
        """The fewest survivors whose sum a round of ``num_clients`` can
        release: the Shamir threshold ``t`` of the graph such a round builds
        (:meth:`graph`, :meth:`setup`). The server prunes every client with
        fewer than ``t`` live neighbours and aborts when a mask cannot be
        removed with ``t`` shares (:mod:`fedtrain.secure.protocol`), so a
        released sum has a survivor and ``t`` surviving neighbours of it,
        more than ``t``; ``t`` is the bound, on the safe side. Distributed
        DP checks its budget against the noise of that many shares."""
        if num_clients <= 1:
            return max(0, num_clients)
        return threshold_for(self.graph(num_clients).min_degree, self.threshold)

    def degree(self, num_clients: int) -> int:
        """Graph degree for a round of ``num_clients``: configured, or ~3·log₂ n."""
        chosen = self.neighbours or default_degree(num_clients)
        return max(1, min(chosen, num_clients - 1)) if num_clients > 1 else 1

    def graph(self, num_clients: int) -> NeighbourGraph:
        """A fresh random neighbourhood graph for a round of ``num_clients``;
        pass it to :meth:`setup`, which derives the threshold from it."""
        if num_clients < 1:
            raise ValueError(f"num_clients = {num_clients}: must be >= 1")
        if num_clients == 1:
            return NeighbourGraph(((),))
        return NeighbourGraph.harary(num_clients, self.degree(num_clients))

    def setup(self, graph: NeighbourGraph, vector_length: int, noise_stddev: float, weighted: bool) -> SecureSetup:
        """The public parameters of a round on ``graph`` (fresh session id),
        one client per vertex.

        The threshold comes from the graph actually built, not from the
        configured degree: :meth:`NeighbourGraph.harary` raises an odd degree
        by one, and ``t`` from the smaller degree would be half of a client's
        neighbours, not a majority, so a coordinator splitting its unmask
        requests between two halves could learn both secrets of one client.

        A round of one client aborts in the protocol (it has no neighbour to
        share with), which is right: the sum of one update is that update.
        """
        num_clients = graph.size
        threshold = threshold_for(graph.min_degree, self.threshold) if num_clients > 1 else 1
        if num_clients > 1 and 2 * threshold <= graph.max_degree:
            raise ValueError(
                f"graph degrees {graph.min_degree} … {graph.max_degree}: threshold {threshold} is not a majority "
                "of every client's neighbours; allowed: a graph whose degrees differ by less than the threshold"
            )
        return SecureSetup(
            session=secrets.token_bytes(SESSION_BYTES),
            num_clients=num_clients,
            vector_length=vector_length,
            bits=self.bits,
            clip_range=self.clip_range,
            max_weight=self.max_weight if weighted else 1,
            threshold=threshold,
            noise_stddev=noise_stddev,
        )


def max_cohort(config: Config) -> int:
    """The most clients a round can have: ``clients_per_round``, or every
    client under Poisson sampling."""
    if config.strategy.sampling is Sampling.POISSON:
        return config.data.num_clients
    return config.strategy.clients_per_round


def check_secure(config: Config) -> None:
    """Refuse a ``[secure]`` table whose ring could overflow or is too coarse
    (:meth:`SecureSettings.of` calls it, so a run is refused before it starts;
    the checks that need no ring arithmetic are :func:`fedtrain.config.validate`'s).

    Under distributed DP the rounding is compared with the noise the run
    will add: ``privacy.noise_multiplier``, or the one calibrated from
    ``privacy.target_epsilon`` (:func:`fedtrain.privacy.setting.user_level_noise`,
    the value the policy uses), never the configured 0."""
    s = config.secure
    ring = Ring(s.bits)
    n = max_cohort(config)
    why = "num_clients, under Poisson sampling" if config.strategy.sampling is Sampling.POISSON else "clients_per_round"
    if n * s.max_weight > ring.max_signed:
        raise ConfigError(
            f"secure.max_weight = {s.max_weight}: up to {n} clients per round ({why}) could sum their weights "
            f"to {n * s.max_weight}, past {ring.max_signed}, the largest sum Z_2^{s.bits} holds; "
            f"allowed: secure.max_weight <= {ring.max_signed // n}, or a larger secure.bits"
        )
    levels = ring.max_signed // n
    if levels < MIN_LEVELS:
        needed = math.ceil(math.log2(MIN_LEVELS * n + 1)) + 1
        raise ConfigError(
            f"secure.bits = {s.bits}: up to {n} clients per round ({why}) leave each client {levels} "
            f"quantisation levels, fewer than {MIN_LEVELS}; allowed: secure.bits >= {needed}"
        )
    if s.neighbours == 1:
        raise ConfigError("secure.neighbours = 1: allowed are 0 (automatic) or >= 2")
    p = config.privacy
    if p.mode is PrivacyMode.DISTRIBUTED:
        if s.clip_range < p.clip:
            raise ConfigError(
                f"secure.clip_range = {s.clip_range}: must be >= privacy.clip = {p.clip}, "
                "or clipped updates would be clamped again"
            )
        rounding = n * (s.clip_range / levels) / 2.0
        noise_multiplier = user_level_noise(config)
        if rounding > ROUNDING_TO_NOISE * noise_multiplier * p.clip:
            origin = (
                "privacy.noise_multiplier" if p.noise_multiplier > 0
                else f"calibrated from privacy.target_epsilon = {p.target_epsilon}"
            )
            raise ConfigError(
                f"secure.bits = {s.bits}: the rounding error of a sum, up to {rounding:.3g}, exceeds "
                f"{ROUNDING_TO_NOISE:.0%} of the noise std {noise_multiplier * p.clip:.3g} (noise multiplier "
                f"{noise_multiplier:.4g}, {origin}); raise secure.bits"
            )

