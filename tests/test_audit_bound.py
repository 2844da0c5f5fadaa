"""The one-run audit's bound (Steinke, Nasr & Jagielski 2023), as pure math."""

from __future__ import annotations

import math

import pytest

from fedtrain.privacy.audit import (
    GUESS_FRACTIONS, audit_bound, epsilon_lower_bound, guess, guess_accuracy, guess_sizes, p_value,
)


def binomial_tail(n: int, k: int, q: float) -> float:
    """P[Binomial(n, q) >= k], summed term by term."""
    return sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize(("guesses", "correct", "epsilon"), [(10, 8, 0.5), (50, 40, 1.0), (200, 150, 0.3), (7, 7, 2.0)])
def test_pure_epsilon_p_value_is_the_binomial_tail(guesses: int, correct: int, epsilon: float) -> None:
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    assert p_value(1000, guesses, correct, epsilon, 0.0) == pytest.approx(binomial_tail(guesses, correct, q), rel=1e-9)


def test_pure_epsilon_bound_inverts_the_binomial_tail() -> None:
    eps = epsilon_lower_bound(500, 100, 80, 0.0, 0.05)
    q = guess_accuracy(eps)
    assert binomial_tail(100, 80, q) == pytest.approx(0.05, rel=1e-6)
    assert binomial_tail(100, 80, guess_accuracy(eps + 1e-3)) > 0.05


def test_hand_case_all_ten_right() -> None:
    """Ten guesses, all right, δ = 0, 95 %: q^10 = 0.05, ε = ln(q / (1 − q))."""
    q = 0.05 ** 0.1
    assert epsilon_lower_bound(10, 10, 10, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    assert math.log(q / (1 - q)) == pytest.approx(1.0519, abs=1e-4)


def test_hand_case_with_delta() -> None:
    """m = r = v = 2, ε = 0 (q = ½): f(2) = ¼; (f(1) − f(2)) / 1 = ½, (f(0) − f(2)) / 2 = 3/8;
    so P ≤ ¼ + 2·2·δ·½ = ¼ + 2δ."""
    assert p_value(2, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 0.02, abs=1e-12)
    assert p_value(2, 2, 2, 0.0, 0.0) == pytest.approx(0.25, abs=1e-12)


def test_delta_zero_is_the_pure_case_and_delta_only_weakens() -> None:
    pure = epsilon_lower_bound(1000, 200, 170, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 200, 170, 1e-12, 0.05) == pytest.approx(pure, abs=1e-6)
    with_delta = epsilon_lower_bound(1000, 200, 170, 1e-5, 0.05)
    assert 0 < with_delta < pure
    assert p_value(1000, 200, 170, 1.0, 1e-5) > p_value(1000, 200, 170, 1.0, 0.0)


def test_bound_grows_with_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in range(50, 101, 5)]
    assert bounds[0] == 0.0
    assert all(b <= c for b, c in zip(bounds, bounds[1:]))
    assert bounds[-1] > 2.0


def test_bound_grows_with_confidence_lowered() -> None:
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, 0.01) < epsilon_lower_bound(1000, 100, 90, 1e-5, 0.1)


def test_chance_level_gives_nothing() -> None:
    assert epsilon_lower_bound(1000, 500, 250, 1e-5, 0.05) == 0.0


def test_guess_counts_right_ones() -> None:
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [True, False, True, False, False, True]
    outcome = guess(scores, included, 2, 2)
    assert (outcome.guess_in, outcome.guess_out, outcome.correct, outcome.made) == (2, 2, 2, 4)


def test_guess_sizes_cover_both_ends() -> None:
    assert guess_sizes(1000) == (10, 25, 50, 100, 250, 500)
    assert guess_sizes(3) == (1,)
    assert len(guess_sizes(1000)) == len(GUESS_FRACTIONS)


def test_audit_bound_pays_for_its_choices() -> None:
    """Perfect separation of 1000 canaries: the bound is that of guessing all
    of them at (1 − confidence) / 6, below the one at the full 1 − confidence."""
    included = [i % 2 == 0 for i in range(1000)]
    scores = [1.0 if b else -1.0 for b in included]
    result = audit_bound(scores, included, 1e-5, 0.95)
    assert result.best is not None and result.best.made == 1000 and result.best.correct == 1000
    assert result.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(1000, 1000, 1000, 1e-5, 0.05 / 6))
    assert result.epsilon_lower_bound < epsilon_lower_bound(1000, 1000, 1000, 1e-5, 0.05)
    assert result.included == 500 and result.choices == 6


def test_refusals_name_the_value() -> None:
    with pytest.raises(ValueError, match="confidence"):
        audit_bound([0.0, 1.0], [True, False], 1e-5, 1.0)
    with pytest.raises(ValueError, match="correct"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="delta"):
        p_value(10, 5, 3, 1.0, 2.0)
