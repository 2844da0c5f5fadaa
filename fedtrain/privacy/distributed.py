"""Distributed DP: DP-FedAvg whose noise the clients add, under secure aggregation.

The mechanism is user-level DP-FedAvg (McMahan et al. 2018; see
:mod:`fedtrain.privacy.user_level`): each client clips its update to L2 norm
``C``, the sum gets Gaussian noise of std ``z·C`` and is divided by the
expected cohort size. Here the coordinator never holds a less noisy value:
each of the round's ``n`` planned clients adds ``N(0, (z·C/√n)²)`` to its own
clipped update before masking (Kairouz, Liu & Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
§1), and secure aggregation reveals only the sum, whose noise is the sum of
the shares: ``N(0, (z·C)²)`` when all ``n`` contribute.

Continuous or discrete noise: the clients draw *continuous* Gaussian noise
(:class:`fedtrain.privacy.noise.SecureGaussian`, a ChaCha20 keystream) and
quantise afterwards, rather than the discrete Gaussian (Canonne, Kamath &
Steinke 2020) or Skellam (Agarwal, Kairouz & Liu 2021) mechanisms those
papers analyse. Their analyses pay off in small rings (12–20 bits), where
rounding is comparable to the noise; fedtrain's default ring has 2^31 / n
levels per client, and the config is refused unless the worst-case rounding of
the sum stays under 1% of the noise std (``fedtrain.secure.quantize.ROUNDING_TO_NOISE``),
so the released sum is the Gaussian mechanism up to that negligible,
data-independent perturbation. Clamping to ``secure.clip_range`` (≥ ``C``)
happens only when a client's own noise share exceeds ``clip_range − C`` in a
coordinate; keep ``clip_range`` many per-client stds above ``C`` (the default
8 is > 20 stds for ``z ≤ 1``, ``C ≤ 1`` and 10 clients).

Dropouts, accounted honestly: a client that drops after training takes its
noise share with it, so ``m`` survivors of ``n`` leave noise of std
``z·C·√(m/n)``. Nothing is topped up (the coordinator adding noise would mean
trusting it with a less noisy sum); the round is accounted with the noise that
actually reached the sum, multiplier ``z·√(m/n)``, composed before the
released update leaves the policy. ``privacy.max_epsilon`` is checked before
the round with the planned ``z``, so a round with dropouts can end slightly
above it; ``metrics.jsonl`` carries the effective multiplier of each round.
A round that aborts releases nothing and costs nothing.

Weights: as in user-level DP every client counts once (unit weights), so the
sensitivity is ``C``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, TypeGuard

from fedtrain.config import PrivacyMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.policy import COORDINATOR_LEDGER, ClientPrivacy, PrivacyReport, Release, coordinator_events
from fedtrain.privacy.user_level import budget_refusal, check_round_setting, round_event
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientUpdate


def is_unit_weight_secure_sum(update: ClientUpdate) -> TypeGuard[AggregateUpdate]:
    """Whether ``update`` is what distributed DP may release: secure
    aggregation's sum (:class:`AggregateUpdate` of origin ``SECURE_SUM``)
    of unit-weight contributions, so that ``num_examples`` is its
    contributors' count and the sensitivity is one clip."""
    return (
        isinstance(update, AggregateUpdate)
        and update.origin is AggregateOrigin.SECURE_SUM
        and update.unit_weights
    )


def effective_noise_multiplier(noise_multiplier: float, contributors: int, planned: int) -> float:
    """``z·√(m/n)``: the multiplier of the noise ``m`` of ``n`` planned noise shares add up to."""
    if planned < 1 or not 0 <= contributors <= planned:
        raise ValueError(
            f"contributors = {contributors}, planned = {planned}: need planned >= 1 and 0 <= contributors <= planned"
        )
    return noise_multiplier * math.sqrt(contributors / planned)


class DistributedDP:
    """Clients clip and add noise shares; the policy accounts the noise that
    reached the sum and releases ``sum / expected cohort``."""

    mode = PrivacyMode.DISTRIBUTED

    def __init__(
        self,
        accountant: Accountant,
        noise_multiplier: float,
        clip: float,
        sample_rate: float,
        amplified: bool,
        expected_cohort: float,
        delta: float,
        max_epsilon: float,
    ) -> None:
        check_round_setting(noise_multiplier, clip, expected_cohort)
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.sample_rate = sample_rate
        self.amplified = amplified
        self.expected_cohort = expected_cohort
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.last_effective = noise_multiplier

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy(clip=self.clip, distributed_noise=self.noise_multiplier * self.clip)

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        planned = round_event(self.noise_multiplier, self.sample_rate, self.amplified)
        return budget_refusal(self.accountant, planned, self.delta, self.max_epsilon, rnd)

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        """Account the round, then release the noisy sum over the expected cohort.

        ``updates`` is the one securely aggregated update (mean of ``m`` unit-weight
        contributions) or nothing when the round aborted; anything else is
        refused, since only a securely aggregated sum carries the full noise.
        A secure aggregate is known by its type and fields
        (:func:`is_unit_weight_secure_sum`), never by its id or its counts:
        a client's own update with ``num_examples == contributors`` is
        refused like any other.
        """
        aggregates: list[AggregateUpdate] = []
        rejected: list[tuple[str, str]] = []
        for u in updates:
            if is_unit_weight_secure_sum(u):
                aggregates.append(u)
            else:
                rejected.append(
                    (u.client_id, "distributed DP releases only a securely aggregated sum of unit-weight contributions")
                )
        if len(aggregates) != 1:
            rejected += [(u.client_id, "expected exactly one secure aggregate per round") for u in aggregates]
            return Release((), tuple(rejected))
        aggregate = aggregates[0]
        planned = max(len(cohort), aggregate.contributors)
        z = effective_noise_multiplier(self.noise_multiplier, aggregate.contributors, planned)
        event = round_event(z, self.sample_rate, self.amplified)
        self.accountant.compose(event)
        self.last_effective = z
        total = aggregate.vector * float(aggregate.num_examples)
        released = AggregateUpdate(
            vector=total / self.expected_cohort,
            num_examples=1,
            kind=aggregate.kind,
            contributors=aggregate.contributors,
            origin=AggregateOrigin.DISTRIBUTED_DP,
        )
        return Release((released,), tuple(rejected), {COORDINATOR_LEDGER: (event,)})

    def report(self) -> PrivacyReport:
        return PrivacyReport(
            epsilon=self.accountant.epsilon(self.delta),
            delta=self.delta,
            extra={
                "clip": self.clip,
                "noise_multiplier": self.noise_multiplier,
                "effective_noise_multiplier": self.last_effective,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "last_effective": self.last_effective}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.last_effective = float(state.get("last_effective", self.noise_multiplier))

    def compose_release_(self, events: Mapping[str, Sequence[GaussianEvent]]) -> None:
        for event in coordinator_events(events, self.mode):
            self.accountant.compose(event)
