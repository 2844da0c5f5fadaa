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
the sum stays under 1% of the noise std actually used, calibrated when
``privacy.target_epsilon`` is set (``fedtrain.secure.setting.ROUNDING_TO_NOISE``),
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
released update leaves the policy. ``privacy.max_epsilon`` is a promise, so
it is checked before the round against the worst case the round can release:
the fewest contributors secure aggregation accepts for a cohort of ``n``
(no fewer than the Shamir threshold of the round's graph, below which it
aborts without revealing anything; :meth:`SecureSettings.fewest_contributors
<fedtrain.secure.setting.SecureSettings.fewest_contributors>`), so the
round's actual cost, composed at release, never ends above the budget.
``metrics.jsonl`` carries the effective multiplier of each round. A round
that aborts releases nothing and costs nothing. Clients that fail before
secure aggregation starts shrink the round's graph and with it the fewest
contributors; such a round is still accounted with the noise that reached
its sum, and a warning says so when that is below the checked worst case.

Weights: as in user-level DP every client counts once (unit weights), so the
sensitivity is ``C``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence, TypeGuard

from fedtrain.config import PrivacyMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.policy import COORDINATOR_LEDGER, ClientPrivacy, PrivacyReport, Release, coordinator_events
from fedtrain.privacy.user_level import budget_refusal, check_round_setting, round_event
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientUpdate

log = logging.getLogger(__name__)


def one_contributor(planned: int) -> int:
    """The fewest contributors of a sum when nothing more is known: one."""
    return min(1, planned)


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
        fewest_contributors: Callable[[int], int] | None = None,
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
        self.fewest_contributors = fewest_contributors or one_contributor
        self._checked: dict[int, int] = {}

    def fewest(self, planned: int) -> int:
        """The fewest contributors a released sum of a ``planned``-client round can have (at least 1)."""
        return max(1, min(planned, self.fewest_contributors(planned)))

    def worst_case_event(self, planned: int, fewest: int | None = None) -> GaussianEvent:
        """The costliest event a round of ``planned`` clients can release: the
        noise of its fewest possible contributors (:meth:`fewest`), ``z·√(m_min/n)``."""
        m = self.fewest(planned) if fewest is None else fewest
        z = effective_noise_multiplier(self.noise_multiplier, m, max(1, planned))
        return round_event(z, self.sample_rate, self.amplified)

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy(clip=self.clip, distributed_noise=self.noise_multiplier * self.clip)

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        """Refuse round ``rnd`` unless even its worst case (:meth:`worst_case_event`)
        stays within ``privacy.max_epsilon``; without a budget nothing is refused."""
        if self.max_epsilon <= 0:
            return None
        planned = len(cohort)
        fewest = self._checked[rnd] = self.fewest(planned)
        worst = self.worst_case_event(planned, fewest)
        return budget_refusal(self.accountant, worst, self.delta, self.max_epsilon, rnd)

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
        checked = self._checked.pop(rnd, None)
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
        if checked is not None and aggregate.contributors < checked:
            log.warning(
                "round %d: %d contributors, fewer than the %d the budget check assumed (clients failed before "
                "secure aggregation); the round is accounted with the noise that reached the sum",
                rnd, aggregate.contributors, checked,
            )
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
