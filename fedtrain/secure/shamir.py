"""Shamir secret sharing over the prime field GF(2^521 − 1).

Shamir 1979, "How to Share a Secret": a secret ``s`` becomes the constant term
of a random polynomial ``f`` of degree ``t − 1``; share ``i`` is ``(x_i,
f(x_i))``. Any ``t`` shares give ``s = f(0)`` by Lagrange interpolation; fewer
reveal nothing about it.

Hand-written, field arithmetic included: the ``cryptography`` package has no
secret sharing. Python integers make the arithmetic exact; share values are
sampled with :mod:`secrets`, never a seeded generator. This is the
bookkeeping of SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", §4), which shares 256-bit secrets:
an X25519 private key and a self-mask seed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

PRIME = 2**521 - 1
"""The Mersenne prime M521 (also the field of NIST P-521). Any prime above
2^256 holds a 32-byte secret; a Mersenne prime is one that is well known to
be prime, so nobody has to trust a hand-picked constant."""

SECRET_BYTES = 32
"""Length of the secrets shared here (X25519 private keys, PRG seeds)."""

SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Bytes of one encoded share value (66)."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of a sharing polynomial; ``x`` is never 0."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 0 < self.x < PRIME:
            raise ValueError(f"share x = {self.x}: must be in 1 … {PRIME - 1}")
        if not 0 <= self.y < PRIME:
            raise ValueError(f"share y = {self.y}: must be in 0 … PRIME - 1")


def split(secret: bytes, xs: Sequence[int], threshold: int) -> tuple[Share, ...]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them
    reconstruct it, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes: must be {SECRET_BYTES}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold = {threshold}: must be in 1 … {len(xs)} (the number of shares)")
    if len(set(xs)) != len(xs):
        raise ValueError(f"share points {list(xs)}: must be distinct")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return tuple(Share(x, _evaluate(coefficients, x)) for x in xs)


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from ``threshold`` shares (Lagrange interpolation at 0).

    Exactly the first ``threshold`` shares are used; a caller that wants to
    detect wrong shares checks the result against a commitment (see
    :mod:`fedtrain.secure.protocol`). Raises ``ValueError`` with fewer shares,
    repeated points, or a value that is not a ``SECRET_BYTES`` secret (which
    only wrong shares produce).
    """
    if threshold < 1 or len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares: reconstruction needs at least threshold = {threshold}")
    points = list(shares[:threshold])
    xs = [s.x for s in points]
    if len(set(xs)) != len(xs):
        raise ValueError(f"share points {xs}: must be distinct")
    secret = 0
    for i, si in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - si.x) % PRIME
        secret = (secret + si.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the interpolated value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
