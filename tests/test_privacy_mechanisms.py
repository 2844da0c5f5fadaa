"""Clipping and Gaussian noise: the pure math under both kinds of DP."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from fedtrain.privacy.mechanisms import add_gaussian_, clip_factors, clip_rows_, per_sample_clipped_sum
from fedtrain.privacy.noise import SecureGaussian, SeededGaussian


def test_secure_gaussian_is_standard_normal() -> None:
    sample = SecureGaussian().gaussian(200_001, 2.0, torch.device("cpu")).double()

    assert sample.shape == (200_001,)
    assert abs(float(sample.mean())) < 0.02
    assert float(sample.std()) == pytest.approx(2.0, rel=0.01)
    assert stats.kstest((sample / 2.0).numpy(), "norm").pvalue > 1e-3


def test_secure_gaussian_never_repeats() -> None:
    source = SecureGaussian()

    a = source.gaussian(64, 1.0, torch.device("cpu"))
    b = source.gaussian(64, 1.0, torch.device("cpu"))
    c = SecureGaussian().gaussian(64, 1.0, torch.device("cpu"))

    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_gaussian_is_reproducible() -> None:
    a = SeededGaussian(3).gaussian(10, 1.0, torch.device("cpu"))
    b = SeededGaussian(3).gaussian(10, 1.0, torch.device("cpu"))

    assert torch.equal(a, b)


def test_negative_std_is_an_error() -> None:
    with pytest.raises(ValueError, match="noise std = -1"):
        SecureGaussian().gaussian(3, -1.0, torch.device("cpu"))


def test_clip_rows_bounds_norms_and_keeps_small_and_zero_rows() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])

    norms = clip_rows_(rows, 1.0)

    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 0.0]))
    assert torch.allclose(rows, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_clip_of_a_vector() -> None:
    v = torch.tensor([6.0, 8.0])

    clip_rows_(v, 2.0)

    assert float(v.norm()) == pytest.approx(2.0)


def test_clip_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="clip bound = 0"):
        clip_factors(torch.ones(2), 0.0)


def test_per_sample_clipping_uses_the_whole_gradient_norm() -> None:
    weight = torch.tensor([[[3.0]], [[0.0]]])
    bias = torch.tensor([[4.0], [0.5]])

    summed, norms = per_sample_clipped_sum([weight, bias], 1.0)

    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert torch.allclose(summed[0], torch.tensor([[0.6]]))
    assert torch.allclose(summed[1], torch.tensor([0.8 + 0.5]))


def test_add_gaussian_with_zero_std_changes_nothing() -> None:
    v = torch.ones(4)

    add_gaussian_(v, 0.0, SecureGaussian())

    assert torch.equal(v, torch.ones(4))
