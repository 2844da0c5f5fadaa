"""The finite ring that masked updates live in, and fixed-point quantisation
into it.

Masking needs a group in which a uniformly random mask hides any input
perfectly (a one-time pad): SecAgg works in ``Z_R`` (Bonawitz et al. 2017,
§3). fedtrain uses ``Z_{2^bits}`` (``secure.bits``, default 32), so ring
arithmetic is native unsigned integer arithmetic with wrap-around, and a
32-bit ring costs 4 bytes per parameter on the wire, like ``float32``.

Quantisation of one client's contribution ``x`` (a float vector):

* each coordinate is clamped to ``[−range, range]`` (``secure.clip_range``);
* it is scaled by ``scale = levels / range`` and rounded to the nearest
  integer, with ``levels = ⌊(2^(bits−1) − 1) / n⌋`` for a round of ``n``
  clients;
* the signed integer is stored modulo ``2^bits``.

Overflow is impossible by construction: ``n`` clients contribute at most
``levels`` each in absolute value, so the true sum lies in
``[−(2^(bits−1) − 1), 2^(bits−1) − 1]`` and the centred lift of the ring sum
recovers it exactly. That needs the clamp to ``±levels`` in integers: above
53 bits ``levels`` is not a ``float64`` (``float((2^63 − 1) // 10)`` is 52
above it), so a clamp in floating point lets ``n`` full-range contributions
wrap the ring. The float → integer conversion therefore never rounds up past
``levels``, and the lift, ``from_signed`` and the range check are shifts and
masks on ``int64``/``uint64`` words, exact for every width 8 … 64.

The price is resolution: the round's step is ``range / levels``, and the
dequantised sum of ``m`` in-range contributions is within
``m · (step / 2 + FLOAT_ROUNDING · range)`` of the real sum
(:meth:`Quantizer.sum_error_bound`); the second term, ``float64`` rounding in
the scaling, dominates only above about 50 bits.
``fedtrain.secure.setting`` refuses configs whose worst-case cohort leaves
fewer than ``MIN_LEVELS`` levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BITS = 8
MAX_BITS = 64

MIN_LEVELS = 1 << 10
"""Fewest quantisation levels per client and sign the config allows: a step
of ``range / 1024``, i.e. about 3 significant digits per coordinate. Ours,
not from a paper: below it quantisation error starts to show in training."""

FLOAT_ROUNDING = 2.0**-50
"""Relative ``float64`` error allowed per contribution in a decoded sum:
``8u`` with the unit roundoff ``u = 2^−53`` of IEEE 754 binary64. Encoding
rounds three times (``float(levels)``, ``levels / range``, ``x · scale``:
at most ``γ₃ ≈ 3u`` relative) and decoding four times (``float(total)``, the
division, and the two roundings of the scale it divides by: below ``5u``);
Higham 2002, "Accuracy and Stability of Numerical Algorithms", Lemma 3.1,
bounds a chain of ``k`` roundings by ``γ_k = k·u / (1 − k·u)``."""


@dataclass(frozen=True)
class Ring:
    """``Z_{2^bits}``, stored as ``uint32`` (bits ≤ 32) or ``uint64``."""

    bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"ring bits = {self.bits!r}: must be an integer in {MIN_BITS} … {MAX_BITS}")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def max_signed(self) -> int:
        """The largest magnitude whose sign the centred lift recovers."""
        return (1 << (self.bits - 1)) - 1

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def reduce_(self, a: np.ndarray) -> np.ndarray:
        """``a mod 2^bits`` in place (a no-op for the native 32 and 64 bits)."""
        if self.bits not in (32, 64):
            np.bitwise_and(a, self.dtype((1 << self.bits) - 1), out=a)
        return a

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)

    def from_signed(self, q: np.ndarray) -> np.ndarray:
        """Signed integers (``int64``) as ring elements (two's complement mod ``2^bits``).

        The ``int64`` words are reinterpreted as ``uint64`` (exactly two's
        complement mod ``2^64``) and masked to ``bits``, so no cast of a
        negative value to an unsigned type is involved at any width.
        """
        words = np.ascontiguousarray(q, dtype=np.int64).view(np.uint64)
        if self.bits < 64:
            words = np.bitwise_and(words, np.uint64((1 << self.bits) - 1))
        return words.astype(self.dtype)

    def to_signed(self, a: np.ndarray) -> np.ndarray:
        """The centred lift: ring elements as ``int64`` in ``[−2^(bits−1), 2^(bits−1))``.

        Sign extension by shifts: the element moves to the top of a
        ``uint64`` word, is read as ``int64`` and shifted back arithmetically.
        Subtracting the modulus instead would need ``2^63`` or ``2^64`` as an
        ``int64``, which does not exist.
        """
        shift = np.uint64(64 - self.bits)
        words = np.left_shift(np.asarray(a).astype(np.uint64), shift)
        return np.right_shift(words.view(np.int64), np.int64(64 - self.bits))

    def rejection_reason(self, vector: object, length: int) -> str | None:
        """Why ``vector`` is not a ring vector of ``length`` elements, or None."""
        if not isinstance(vector, np.ndarray):
            return f"masked vector is a {type(vector).__name__}, expected a numpy array"
        if vector.dtype != self.dtype:
            return f"masked vector dtype {vector.dtype}, expected {np.dtype(self.dtype)}"
        if vector.shape != (length,):
            return f"masked vector shape {vector.shape}, expected ({length},)"
        if self.bits not in (32, 64) and int(vector.max(initial=0)) >= self.modulus:
            return f"masked vector has elements >= 2^{self.bits}"
        return None


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding of one round's contributions (see the module docstring)."""

    ring: Ring
    clip_range: float
    num_clients: int

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"clip_range = {self.clip_range}: must be > 0")
        if self.num_clients < 1:
            raise ValueError(f"num_clients = {self.num_clients}: must be >= 1")
        if self.levels < 1:
            raise ValueError(
                f"num_clients = {self.num_clients}: a {self.ring.bits}-bit ring holds sums of at most "
                f"{self.ring.max_signed} clients"
            )

    @property
    def levels(self) -> int:
        """Largest integer magnitude one client may contribute."""
        return self.ring.max_signed // self.num_clients

    @property
    def scale(self) -> float:
        return self.levels / self.clip_range

    @property
    def step(self) -> float:
        """Value of one quantisation step."""
        return self.clip_range / self.levels

    @property
    def float_levels(self) -> float:
        """The largest ``float64`` that is at most :attr:`levels`: the float
        clamp bound, so that the conversion to ``int64`` never rounds a
        magnitude up past ``levels`` (nor past ``2^63 − 1``, at one client)."""
        bound = float(self.levels)
        return bound if int(bound) <= self.levels else float(np.nextafter(bound, 0.0))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``x`` clamped to ``[−range, range]``, rounded to the nearest step, as
        ring elements; every integer lies in ``[−levels, levels]``."""
        values = np.asarray(x, dtype=np.float64)
        if np.isnan(values).any():
            raise ValueError("contribution has NaN values: a NaN has no place in the ring")
        q = np.rint(np.clip(values, -self.clip_range, self.clip_range) * self.scale)
        bound = self.float_levels
        np.clip(q, -bound, bound, out=q)
        integers = q.astype(np.int64)
        levels = np.int64(self.levels)
        np.clip(integers, -levels, levels, out=integers)
        return self.ring.from_signed(integers)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float sum (``float64``) that the ring sum of encoded contributions stands for."""
        return self.ring.to_signed(total).astype(np.float64) / self.scale

    def sum_error_bound(self, contributions: int) -> float:
        """Largest error of a decoded sum of ``contributions`` in-range vectors,
        per coordinate: half a step of rounding each, plus ``float64`` rounding
        relative to the range (:data:`FLOAT_ROUNDING`)."""
        return contributions * (self.step / 2.0 + FLOAT_ROUNDING * self.clip_range)
