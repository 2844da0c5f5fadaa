"""User-level DP on the coordinator: DP-FedAvg with fixed or adaptive clipping.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models": each client clips its update to L2 norm ``C``; the coordinator adds
``N(0, (z·C)²)`` to the sum and divides by the *expected* cohort size, a
fixed public denominator, so one client changes the result by at most
``C / expected`` (the f̃_f estimator with unit weights).

Weights: every client counts once. Weighting by record count would make the
sensitivity depend on a client's data size; McMahan et al. cap the weights
for that, which fedtrain does not implement, so user-level DP ignores the
strategy's ``weighted`` option (the strategy sees one, already averaged,
update).

Sampling: with Poisson sampling at rate ``q`` each round is a sampled Gaussian
mechanism ``(z, q)`` (amplification by sampling; Mironov et al. 2019).
Fixed-size uniform sampling has no such bound in Opacus' accountants; a
population with one client more or less then changes the cohort by a
substitution, sensitivity ``2C``, so fedtrain accounts it as ``(z/2, q = 1)``:
correct, and far more pessimistic. Use ``strategy.sampling = "poisson"``.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"): clients also report whether their update was within
``C``; the coordinator sums ``b_i − ½`` (sensitivity ½) with noise ``σ_b``,
estimates the fraction within ``C`` and moves
``C ← C·exp(−η (b̃ − γ))`` toward the ``γ`` quantile. The update noise is
raised to ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so that the two releases together
are one Gaussian mechanism of multiplier ``z`` (their Theorem 1), which is
what the accountant composes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from fedtrain.aggregation import FoldedClient, Reduction, UpdateFold, stack
from fedtrain.config import PrivacyMode
from fedtrain.privacy.accountant import Accountant
from fedtrain.privacy.events import GaussianEvent
from fedtrain.privacy.mechanisms import add_gaussian_
from fedtrain.privacy.noise import NoiseSource
from fedtrain.privacy.policy import COORDINATOR_LEDGER, ClientPrivacy, PrivacyReport, Release, coordinator_events
from fedtrain.types import AggregateOrigin, AggregateUpdate, ClientMetric, ClientUpdate, UpdateKind

_UNCLIPPED = ClientMetric.UNCLIPPED.value

NORM_TOLERANCE = 1e-5
"""Relative slack on the clip bound for float32 rounding of a clipped update."""


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021's geometric update toward the ``target_quantile``."""

    target_quantile: float
    learning_rate: float
    count_stddev: float


def update_noise_multiplier(total: float, count_stddev: float) -> float:
    """``z_Δ`` with ``z_Δ⁻² + (2σ_b)⁻² = z⁻²`` (Andrew et al. 2021, Thm. 1)."""
    remaining = total**-2 - (2.0 * count_stddev) ** -2
    if remaining <= 0:
        raise ValueError(
            f"privacy.clipped_count_stddev = {count_stddev}: must exceed noise_multiplier / 2 = "
            f"{total / 2:.4g} so that the clipped count leaves noise budget for the update"
        )
    return remaining**-0.5


def round_event(noise_multiplier: float, sample_rate: float, amplified: bool) -> GaussianEvent:
    """One round's privacy event (see the module docstring for ``amplified``)."""
    if amplified:
        return GaussianEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return GaussianEvent(noise_multiplier=noise_multiplier / 2.0, sample_rate=1.0)


def check_round_setting(noise_multiplier: float, clip: float, expected_cohort: float) -> None:
    """Raise, naming the key, unless the round's noise, clip and cohort are positive."""
    if noise_multiplier <= 0:
        raise ValueError(f"privacy.noise_multiplier = {noise_multiplier}: must be > 0")
    if clip <= 0:
        raise ValueError(f"privacy.clip = {clip}: must be > 0")
    if expected_cohort <= 0:
        raise ValueError(f"expected cohort = {expected_cohort}: must be > 0")


def budget_refusal(
    accountant: Accountant, event: GaussianEvent, delta: float, max_epsilon: float, rnd: int
) -> str | None:
    """Why round ``rnd`` (one ``event``) would exceed ``max_epsilon``, or None
    (always None when no budget is set)."""
    if max_epsilon <= 0:
        return None
    after = accountant.epsilon_if(event, delta)
    if after > max_epsilon:
        return (
            f"round {rnd} would raise ε from {accountant.epsilon(delta):.4g} to "
            f"{after:.4g} > privacy.max_epsilon = {max_epsilon}"
        )
    return None


class UserLevelDP:
    """DP-FedAvg's privatisation of one round's updates, and its ledger."""

    mode = PrivacyMode.USER

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
        noise: NoiseSource,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        check_round_setting(noise_multiplier, clip, expected_cohort)
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier
        self.update_multiplier = (
            update_noise_multiplier(noise_multiplier, adaptive.count_stddev) if adaptive else noise_multiplier
        )
        self.clip = clip
        self.event = round_event(noise_multiplier, sample_rate, amplified)
        self.expected_cohort = expected_cohort
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.noise = noise
        self.adaptive = adaptive

    def client_privacy(self, rnd: int) -> ClientPrivacy:
        return ClientPrivacy(clip=self.clip)

    def check(self, rnd: int, cohort: Sequence[str]) -> str | None:
        return budget_refusal(self.accountant, self.event, self.delta, self.max_epsilon, rnd)

    def admit(self, update: ClientUpdate, norm: float) -> str | None:
        """Why a valid ``update`` of L2 norm ``norm`` may not enter the sum:
        above the clip (with :data:`NORM_TOLERANCE`), or, under adaptive
        clipping, without its ``unclipped`` bit."""
        if norm > self.clip * (1.0 + NORM_TOLERANCE):
            return f"update norm {norm:.6g} exceeds privacy.clip = {self.clip:.6g}"
        if self.adaptive is not None and update.metrics.get(_UNCLIPPED) not in (0.0, 1.0):
            return f"metric {_UNCLIPPED!r} missing or not 0/1 under adaptive clipping"
        return None

    def reduction(self, needs_individual_updates: bool, weighted: bool) -> Reduction | None:
        """The unit-weight sum, whatever the strategy: it sees one noisy mean."""
        return Reduction.SUM

    def release(self, rnd: int, cohort: Sequence[str], updates: Sequence[ClientUpdate]) -> Release:
        self.accountant.compose(self.event)
        accepted: list[ClientUpdate] = []
        rejected: list[tuple[str, str]] = []
        for u in updates:
            reason = self.admit(u, float(u.vector.norm()))
            if reason is None:
                accepted.append(u)
            else:
                rejected.append((u.client_id, reason))
        released: tuple[ClientUpdate, ...] = ()
        if updates:
            total = stack(accepted).sum(dim=0) if accepted else torch.zeros_like(updates[0].vector)
            released = (self._noisy_mean(total, updates[0].kind),)
        if self.adaptive is not None:
            self._adapt_clip(accepted)
        return Release(released, tuple(rejected), {COORDINATOR_LEDGER: (self.event,)})

    def release_fold(self, rnd: int, cohort: Sequence[str], fold: UpdateFold, validated: int) -> Release:
        """:meth:`release` of the admitted updates summed in ``fold``: a
        release (noise alone when none was admitted) whenever an update
        passed validation."""
        self.accountant.compose(self.event)
        released: tuple[ClientUpdate, ...] = ()
        if validated:
            total = (
                fold.result() if fold.count
                else torch.zeros(fold.numel, dtype=torch.float32, device=fold.device)
            )
            released = (self._noisy_mean(total, fold.kind),)
        if self.adaptive is not None:
            self._adapt_clip(fold.clients)
        return Release(released, (), {COORDINATOR_LEDGER: (self.event,)})

    def _noisy_mean(self, total: torch.Tensor, kind: UpdateKind) -> AggregateUpdate:
        """``(total + N(0, (z_Δ·C)²)) / expected``; ``total`` is noised in place."""
        add_gaussian_(total, self.update_multiplier * self.clip, self.noise)
        mean = total / self.expected_cohort
        return AggregateUpdate(vector=mean, num_examples=1, kind=kind, origin=AggregateOrigin.DP_FEDAVG)

    def _adapt_clip(self, accepted: Sequence[ClientUpdate | FoldedClient]) -> None:
        adaptive = self.adaptive
        if adaptive is None:
            return
        centered = torch.tensor([sum(u.metrics[_UNCLIPPED] - 0.5 for u in accepted)], dtype=torch.float32)
        add_gaussian_(centered, adaptive.count_stddev, self.noise)
        fraction = float(centered[0]) / self.expected_cohort + 0.5
        self.clip *= math.exp(-adaptive.learning_rate * (fraction - adaptive.target_quantile))

    def report(self) -> PrivacyReport:
        return PrivacyReport(
            epsilon=self.accountant.epsilon(self.delta),
            delta=self.delta,
            extra={"clip": self.clip, "noise_multiplier": self.noise_multiplier},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clip": self.clip, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.clip = float(state["clip"])
        self.noise.load_state_dict(state.get("noise", {}))

    def compose_release_(self, events: Mapping[str, Sequence[GaussianEvent]]) -> None:
        for event in coordinator_events(events, self.mode):
            self.accountant.compose(event)
