"""A lower bound on ε from one training run: the statistics of a privacy audit.

Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). ``m`` canaries are each included in the run independently with
probability ½; after training the auditor scores every canary, guesses "in"
for the ``k+`` highest scores and "out" for the ``k−`` lowest, and abstains on
the rest. If the run is (ε, δ)-DP with respect to each canary, the number ``W``
of correct guesses among the ``r = k+ + k−`` made obeys their main theorem
for (ε, δ)-DP (arXiv:2305.08846; their reference code computes the same
p-value):

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i = 1 … v} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v]

(``f`` alone is their bound for pure ε-DP). An outcome of ``v`` correct
guesses whose bound is at most ``1 − confidence`` refutes (ε, δ)-DP at that
confidence; the largest ε refuted is the audit's lower bound, found by
bisection as in the paper's reference code (the bound grows with ε).

Several guess counts are tried; each is tested at ``(1 − confidence) / n``
for ``n`` counts (a union bound), so that choosing the best one after seeing
the scores keeps the stated confidence. Pure functions, no randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The guess counts tried, as fractions of the ``m / 2`` canaries expected on
each side: ``k+ = k− = ⌈f · m / 2⌉``. Steinke et al. (§7) find the bound
best with a small share of confident guesses when the signal is weak and with
all canaries guessed when it is strong, so both ends are in the list."""

BISECTION_STEPS = 60
MAX_EPSILON = 100.0
"""Where the search for ε stops: beyond it every outcome is plausible to double precision."""


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"audit counts: need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})"
        )


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"privacy.delta = {delta}: an audit needs δ in [0, 1]")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence = {confidence}: must be in (0, 1), e.g. 0.95")


def guess_accuracy(epsilon: float) -> float:
    """``e^ε / (1 + e^ε)``: the best accuracy of a guess of one ε-DP bit (randomised response)."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The most probability an (ε, δ)-DP run gives ``correct`` or more right
    guesses out of ``guesses``, with ``canaries`` canaries in all (Steinke et
    al. 2023, arXiv:2305.08846: the (ε, δ) bound, the pure-ε binomial tail when ``delta`` is 0); at most 1."""
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if epsilon < 0:
        raise ValueError(f"epsilon = {epsilon}: must be >= 0")
    q = guess_accuracy(epsilon)
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0.0 or correct == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    spread = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + 2.0 * canaries * delta * spread, 1.0)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose :func:`p_value` for this outcome is at most
    ``significance`` (``1 − confidence``): the run is not (ε, δ)-DP for any
    smaller ε, unless an event of probability ``significance`` happened.
    0 when even ε = 0 explains the outcome."""
    _check_counts(canaries, guesses, correct)
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance = {significance}: must be in (0, 1)")
    if p_value(canaries, guesses, correct, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) <= significance:
        low, high = high, 2.0 * high
        if high > MAX_EPSILON:
            return MAX_EPSILON
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if p_value(canaries, guesses, correct, middle, delta) <= significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Guesses:
    """One choice of guesses and how many were right."""

    guess_in: int
    guess_out: int
    correct: int

    @property
    def made(self) -> int:
        return self.guess_in + self.guess_out


def guess(scores: Sequence[float], included: Sequence[bool], guess_in: int, guess_out: int) -> Guesses:
    """Guess "in" for the ``guess_in`` highest scores and "out" for the
    ``guess_out`` lowest (ties broken by position), and count the right ones."""
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"audit: {m} scores but {len(included)} inclusion bits")
    if guess_in < 0 or guess_out < 0 or guess_in + guess_out > m:
        raise ValueError(f"audit: guesses in = {guess_in}, out = {guess_out}: need both >= 0 and sum <= {m}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    bits = np.asarray(included, dtype=bool)
    right_in = int(bits[order[:guess_in]].sum())
    right_out = int((~bits[order[m - guess_out:]]).sum()) if guess_out else 0
    return Guesses(guess_in, guess_out, right_in + right_out)


def guess_sizes(canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[int, ...]:
    """The distinct per-side guess counts ``⌈f · m / 2⌉`` of ``fractions``, each at least 1."""
    half = canaries // 2
    return tuple(sorted({max(1, min(half, math.ceil(f * canaries / 2))) for f in fractions})) if half else ()


@dataclass(frozen=True)
class AuditBound:
    """The audit's outcome: the lower bound, at which confidence, from which guesses."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    best: Guesses | None
    choices: int


def audit_bound(
    scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditBound:
    """The best lower bound over the guess counts of :func:`guess_sizes`,
    each tested at ``(1 − confidence) / count`` (a union bound over the
    choices, so the result holds at ``confidence``)."""
    _check_confidence(confidence)
    _check_delta(delta)
    m = len(scores)
    sizes = guess_sizes(m, fractions)
    significance = (1.0 - confidence) / max(1, len(sizes))
    best: Guesses | None = None
    bound = 0.0
    for k in sizes:
        outcome = guess(scores, included, k, k)
        eps = epsilon_lower_bound(m, outcome.made, outcome.correct, delta, significance)
        if best is None or eps > bound:
            best, bound = outcome, eps
    return AuditBound(bound, confidence, delta, m, int(sum(bool(b) for b in included)), best, len(sizes))
