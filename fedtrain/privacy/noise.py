"""Gaussian noise for differential privacy, from a cryptographic source.

DP noise is a secret: whoever can predict it can subtract it. ``SecureGaussian``
draws its uniforms from a :class:`~fedtrain.privacy.keystream.Keystream` (one
ChaCha20 stream under a key from ``secrets``, never restarted, so consecutive
draws are independent) and turns them into normals with the Box–Muller
transform. ``SeededGaussian`` uses a seeded ``torch.Generator`` for
reproducible experiments only; it protects nothing.

Floating-point Gaussian samples leak through their low-order bits: the set of
doubles a sampler can produce around ``x`` depends on ``x``, so an exact
output can rule out some inputs (Mironov 2012, "On Significance of the Least
Significant Bits for Differential Privacy"). ``SecureGaussian`` answers it as
Opacus' ``secure_mode`` does, following Holohan & Braghin 2021 ("Secure
Random Sampling in Differential Privacy", ESORICS): each sample is the sum of
``SUMMED_DRAWS`` independent normals of std ``std / √SUMMED_DRAWS``, computed
in float64 and rounded once to float32, so the output's low bits are no
longer a function of one Box–Muller pair. It is a mitigation, not a proof; a
discrete Gaussian (Canonne, Kamath & Steinke 2020) would be one.

Noise for a tensor on a CUDA device is made on that device
(:func:`gaussian_from_words`), and the key stays where it is: the ChaCha20
key (256 bits) and nonce (96 bits) come from :func:`secrets.token_bytes`
(the operating system's CSPRNG) and the keystream is computed on the CPU by
``cryptography`` (see :mod:`fedtrain.privacy.keystream`); only its raw 64-bit
words are copied to the device, which applies the public, deterministic
transform (53-bit uniforms, Box–Muller, the sum of ``SUMMED_DRAWS``, one
rounding to float32) with float64 torch ops. All the randomness is the
keystream, so the GPU's own generator (Philox, counter-based and not meant to
be unpredictable) is never used for anything secret; the words are as secret
as the noise, which lives on the device anyway. The device computes the same
float64 operations as the CPU path, so the noise equals what the CPU path
makes of the same words up to the last bits of the device's ``log``/``cos``/
``sin`` (one float32 rounding usually absorbs them).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Protocol

import torch

from fedtrain.privacy.keystream import Keystream, uniform_from_words

_TWO_PI = 2.0 * math.pi

SUMMED_DRAWS = 4
"""Normals summed per sample: Opacus' ``secure_mode`` sums 4 (its
``_generate_noise``), after Holohan & Braghin 2021, §5.1: the attack then
costs about 2^159 guesses instead of 2^53."""


class NoiseSource(Protocol):
    """Draws i.i.d. ``N(0, std²)`` samples."""

    def gaussian(self, n: int, std: float, device: torch.device) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SecureGaussian:
    """Normals from a secret ChaCha20 keystream (RFC 8439), summed against
    the floating-point attack (see the module docstring)."""

    def __init__(self) -> None:
        self._stream = Keystream()

    def gaussian(self, n: int, std: float, device: torch.device) -> torch.Tensor:
        if std < 0:
            raise ValueError(f"noise std = {std}: must be >= 0")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        if device.type != "cpu":
            return self.gaussian_on(n, std, device)
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(SUMMED_DRAWS):
            total += box_muller(self._stream.uniform(2 * ((n + 1) // 2)))[:n]
        return (total * (std / math.sqrt(SUMMED_DRAWS))).to(torch.float32).to(device)

    def gaussian_on(self, n: int, std: float, device: torch.device) -> torch.Tensor:
        """``n`` samples made on ``device`` (:func:`gaussian_from_words`) from
        the next ``SUMMED_DRAWS`` pieces of the keystream, copied there one at
        a time: what :meth:`gaussian` does for a non-CPU device, and on the
        CPU the same values as its CPU path would make of those pieces."""
        if std < 0:
            raise ValueError(f"noise std = {std}: must be >= 0")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        count = 2 * ((n + 1) // 2)
        draws = (self._stream.words(count).to(device) for _ in range(SUMMED_DRAWS))
        return gaussian_from_words(draws, n, std)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the key never leaves the process; a resumed run draws from a fresh one."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def gaussian_from_words(draws: Iterable[torch.Tensor], n: int, std: float) -> torch.Tensor:
    """``n`` float32 samples of ``N(0, std²)`` on the device of ``draws``:
    each draw (``int64`` words, at least ``n`` of them, an even number) gives
    ``n`` Box–Muller normals of its :func:`uniform_from_words`; the draws'
    normals are summed in float64 and scaled by ``std / √(number of draws)``,
    as :meth:`SecureGaussian.gaussian` does on the CPU. Draws are consumed
    one at a time, so an iterator that copies each to the device holds one
    draw there at once."""
    if std < 0:
        raise ValueError(f"noise std = {std}: must be >= 0")
    total: torch.Tensor | None = None
    count = 0
    for words in draws:
        if words.numel() < n or words.numel() % 2:
            raise ValueError(f"a draw of {words.numel()} words for {n} samples: need an even number >= {n}")
        if total is None:
            total = torch.zeros(n, dtype=torch.float64, device=words.device)
        total += box_muller(uniform_from_words(words))[:n]
        count += 1
    if total is None:
        raise ValueError("gaussian_from_words: no draws")
    return (total * (std / math.sqrt(count))).to(torch.float32)


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from an even number of uniforms in (0, 1] (Box & Muller 1958):
    ``√(−2 ln u₁)·cos(2π u₂)`` then ``√(−2 ln u₁)·sin(2π u₂)``, the first half
    of ``u`` as ``u₁``. Computed in place into one output (half the memory
    traffic of temporaries and a concatenation); IEEE multiplication is
    commutative, so the values are those of the expression as written."""
    pairs = u.numel() // 2
    out = torch.empty(2 * pairs, dtype=u.dtype, device=u.device)
    radius = torch.log(u[:pairs]).mul_(-2.0).sqrt_()
    angle = torch.mul(u[pairs : 2 * pairs], _TWO_PI)
    torch.cos(angle, out=out[:pairs]).mul_(radius)
    torch.sin(angle, out=out[pairs:]).mul_(radius)
    return out


class SeededGaussian:
    """Normals from a seeded ``torch.Generator``: reproducible, not secret."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def gaussian(self, n: int, std: float, device: torch.device) -> torch.Tensor:
        if std < 0:
            raise ValueError(f"noise std = {std}: must be >= 0")
        noise = torch.randn(n, generator=self._generator, dtype=torch.float64) * std
        return noise.to(torch.float32).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self._generator.set_state(state["generator"])


def noise_source(secure: bool, seed: int) -> NoiseSource:
    """``SecureGaussian`` when ``secure`` (the default), else ``SeededGaussian(seed)``."""
    return SecureGaussian() if secure else SeededGaussian(seed)
