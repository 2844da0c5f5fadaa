"""Gaussian noise for differential privacy, from a cryptographic source.

DP noise is a secret: whoever can predict it can subtract it. ``SecureGaussian``
draws its uniforms from a ChaCha20 keystream (the ``cryptography`` package)
keyed by ``secrets.token_bytes``, and turns them into normals with the
Box–Muller transform. ``SeededGaussian`` uses a seeded ``torch.Generator`` for
reproducible experiments only; it protects nothing.

Known limitation: floating-point Gaussian samples leak through their
low-order bits (Mironov 2012, "On Significance of the Least Significant Bits
for Differential Privacy"); no mainstream DP library for deep learning,
Opacus included, defends against that yet, and neither does this module.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Mapping, Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO_PI = 2.0 * math.pi
_U53 = 2.0**-53


class NoiseSource(Protocol):
    """Draws i.i.d. ``N(0, std²)`` samples."""

    def gaussian(self, n: int, std: float, device: torch.device) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SecureGaussian:
    """Normals from a ChaCha20 keystream (RFC 8439) under a fresh 256-bit key.

    Each call uses a new 128-bit nonce/counter block, so no keystream is ever
    reused.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._calls = 0

    def _uniform(self, count: int) -> torch.Tensor:
        """``count`` uniforms in (0, 1] with 53 random bits each."""
        nonce = self._calls.to_bytes(16, "little")
        self._calls += 1
        stream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        raw = bytearray(stream.update(bytes(8 * count)))
        words = torch.frombuffer(raw, dtype=torch.int64)
        top53 = torch.bitwise_right_shift(words, 11) & ((1 << 53) - 1)
        return (top53.to(torch.float64) + 1.0) * _U53

    def gaussian(self, n: int, std: float, device: torch.device) -> torch.Tensor:
        if std < 0:
            raise ValueError(f"noise std = {std}: must be >= 0")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        pairs = (n + 1) // 2
        u = self._uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = _TWO_PI * u[pairs:]
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (normals * std).to(torch.float32).to(device)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the key never leaves the process; a resumed run draws from a fresh one."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


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
