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
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol

import torch

from fedtrain.privacy.keystream import Keystream

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
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(SUMMED_DRAWS):
            total += box_muller(self._stream.uniform(2 * ((n + 1) // 2)))[:n]
        return (total * (std / math.sqrt(SUMMED_DRAWS))).to(torch.float32).to(device)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the key never leaves the process; a resumed run draws from a fresh one."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from an even number of uniforms in (0, 1] (Box & Muller 1958)."""
    pairs = u.numel() // 2
    radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
    angle = _TWO_PI * u[pairs : 2 * pairs]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])


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
