"""The ring Z_{2^bits} and fixed-point quantisation at every width 8 … 64:
contributions at the clamp edges sum without wrapping and decode with the
right sign and value, the centred lift is exact at the uint64/int64 edges,
and 63- and 64-bit rings train like plain aggregation end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain import config
from fedtrain.secure.quantize import MAX_BITS, MIN_BITS, Quantizer, Ring
from fedtrain.simulation import simulate

WIDTHS = list(range(MIN_BITS, MAX_BITS + 1))
CLIP = 8.0


def _cohorts(ring: Ring) -> list[int]:
    """Cohort sizes to try in ``ring``: one client, a few, and the most whose
    contributions still get two levels each."""
    return sorted({n for n in (1, 2, 3, 10, 127, ring.max_signed // 2) if ring.max_signed // n >= 1})


def _ring_sum(ring: Ring, vectors: list[np.ndarray]) -> np.ndarray:
    """The ring sum as the coordinator computes it: numpy's wrapping adds."""
    total = ring.zeros(vectors[0].shape[0])
    for v in vectors:
        np.add(total, v, out=total)
        ring.reduce_(total)
    return total


def _ring_sum_of_copies(ring: Ring, counted: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """``Σ count · vector mod 2^bits`` in Python integers, for cohorts too
    large to add one by one."""
    length = counted[0][0].shape[0]
    total = [sum(count * int(v[j]) for v, count in counted) % ring.modulus for j in range(length)]
    return np.array(total, dtype=ring.dtype)


@pytest.mark.parametrize("bits", WIDTHS)
def test_full_range_contributions_sum_without_wrapping_at_every_width(bits: int) -> None:
    ring = Ring(bits)
    for n in _cohorts(ring):
        q = Quantizer(ring, CLIP, n)
        # Coordinates: at +clip, at −clip, far beyond both (clamped), and exactly 0.
        edge = np.array([CLIP, -CLIP, 1e300, -np.inf, 0.0])
        mixed_plus = np.array([CLIP, CLIP, -CLIP, CLIP, -CLIP])
        mixed_minus = -mixed_plus
        all_plus = np.full(5, CLIP)
        for label, counted, expected in (
            ("edge", [(edge, n)], n * np.array([CLIP, -CLIP, CLIP, -CLIP, 0.0])),
            ("all +clip", [(all_plus, n)], np.full(5, n * CLIP)),
            ("all -clip", [(-all_plus, n)], np.full(5, -n * CLIP)),
            ("mixed", [(mixed_plus, (n + 1) // 2), (mixed_minus, n // 2)], (n % 2) * mixed_plus),
        ):
            encoded = [(q.encode(v), count) for v, count in counted]
            for e, _ in encoded:
                assert e.dtype == ring.dtype
                assert np.abs(ring.to_signed(e)).max() <= q.levels, (bits, n, label)
            total = _ring_sum_of_copies(ring, encoded)
            if n <= 127:
                assert np.array_equal(_ring_sum(ring, [e for e, count in encoded for _ in range(count)]), total)
            decoded = q.decode(total)
            error = np.abs(decoded - expected).max()
            assert error <= q.sum_error_bound(n), (bits, n, label, decoded, expected)
            assert np.array_equal(np.sign(decoded), np.sign(expected)), (bits, n, label, decoded)


@pytest.mark.parametrize("bits", [52, 53, 54, 56, 60, 62, 63, 64])
def test_decoded_sums_of_arbitrary_values_stay_within_the_documented_bound(bits: int) -> None:
    ring = Ring(bits)
    n, length = 10, 2_000
    q = Quantizer(ring, CLIP, n)
    rng = np.random.default_rng(bits)
    x = rng.uniform(-CLIP, CLIP, (n, length))
    x[:, :10] = CLIP * np.sign(x[:, :10])

    decoded = q.decode(_ring_sum(ring, [q.encode(row) for row in x]))

    exact = np.array([math.fsum(x[:, j]) for j in range(length)])
    assert np.abs(decoded - exact).max() <= q.sum_error_bound(n)
    # The bound is a bound on rounding, not a licence: it stays far below one step of a 32-bit ring.
    assert q.sum_error_bound(n) < Quantizer(Ring(32), CLIP, n).step


@pytest.mark.parametrize("bits", WIDTHS)
def test_the_centred_lift_inverts_from_signed_at_the_int64_edges(bits: int) -> None:
    ring = Ring(bits)
    low, high = -(1 << (bits - 1)), ring.max_signed
    signed = np.array([low, low + 1, -1, 0, 1, high - 1, high], dtype=np.int64)

    elements = ring.from_signed(signed)

    assert elements.dtype == ring.dtype
    assert all(0 <= int(e) < ring.modulus for e in elements)
    assert [int(e) for e in elements] == [v % ring.modulus for v in signed.tolist()]
    assert np.array_equal(ring.to_signed(elements), signed)
    assert ring.rejection_reason(elements, signed.shape[0]) is None


@pytest.mark.parametrize("bits", [33, 48, 62, 63])
def test_a_vector_with_an_element_past_the_modulus_is_rejected(bits: int) -> None:
    ring = Ring(bits)
    inside = np.array([0, ring.modulus - 1], dtype=np.uint64)
    outside = np.array([0, ring.modulus], dtype=np.uint64)

    assert ring.rejection_reason(inside, 2) is None
    assert ring.rejection_reason(outside, 2) == f"masked vector has elements >= 2^{bits}"


def test_a_nan_contribution_is_refused_rather_than_cast_to_an_arbitrary_integer() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Quantizer(Ring(64), CLIP, 3).encode(np.array([0.0, np.nan]))


def test_63_and_64_bit_rings_train_exactly_like_plain_aggregation(tmp_path: Path) -> None:
    common = ["run.rounds=2", "data.num_clients=6", "strategy.clients_per_round=6"]

    plain = simulate(config.load(None, common), out_dir=tmp_path / "plain")
    for bits in (63, 64):
        secure = simulate(
            config.load(None, common + ["secure.aggregation=true", f"secure.bits={bits}"]),
            out_dir=tmp_path / f"secure{bits}",
        )
        assert all(r.num_clients == 6 and r.num_failed == 0 for r in secure.records), bits
        assert abs(secure.summary.final_accuracy - plain.summary.final_accuracy) <= 0.01, bits
        assert torch.allclose(secure.params, plain.params, atol=1e-5), bits
