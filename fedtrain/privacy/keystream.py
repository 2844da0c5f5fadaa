"""A secret random stream: one ChaCha20 keystream per instance, never restarted.

Everything secret that fedtrain draws in bulk on the coordinator or a client
(DP noise, and under DP the cohort and the Poisson batches) comes from a
:class:`Keystream`. It is ChaCha20 (RFC 8439) under a 256-bit key from
:func:`secrets.token_bytes`, through the ``cryptography`` package.

That package's ``algorithms.ChaCha20(key, nonce)`` takes a 16-byte value
whose first 4 bytes are the little-endian *block counter* and whose last 12
are RFC 8439's nonce. fedtrain sets the counter to 0 and the nonce to 12
fresh random bytes, once, and then reads the one encryptor onward: successive
draws are successive, disjoint pieces of one keystream, so no (key, nonce,
counter) triple is ever used twice. An earlier version built a new encryptor
per draw with the draw's index in those first bytes, so draw ``k + 1`` was
draw ``k`` shifted by one 64-byte block; a test of independence between
draws (``tests/test_keystream.py``) guards against that coming back.

A 32-bit block counter covers 2^32 blocks of 64 bytes (256 GiB) per
(key, nonce); the stream re-keys with a fresh key and nonce before it gets
there, so it never wraps.
"""

from __future__ import annotations

import secrets

import torch

KEY_BYTES = 32
NONCE_BYTES = 12
COUNTER_BYTES = 4
_BLOCK = 64
_BLOCKS_PER_KEY = 1 << 32
"""RFC 8439 §2.3: the 32-bit block counter; 2^32 blocks of 64 bytes per (key, nonce)."""
_U53 = 2.0**-53


class Keystream:
    """Secret random bytes, uniforms and Bernoulli draws from one ChaCha20 stream."""

    def __init__(self) -> None:
        self._rekey()

    def _rekey(self) -> None:
        # imported here, so that runs which never draw a secret do not load cryptography
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        counter0 = bytes(COUNTER_BYTES)
        nonce = counter0 + secrets.token_bytes(NONCE_BYTES)
        self._encryptor = Cipher(algorithms.ChaCha20(secrets.token_bytes(KEY_BYTES), nonce), mode=None).encryptor()
        self._left = _BLOCKS_PER_KEY * _BLOCK

    def read(self, count: int) -> bytearray:
        """The next ``count`` bytes of the stream, never returned before.

        The stream is read in whole 64-byte blocks; the unread tail of the
        last block is dropped, so every call starts on a fresh block.
        """
        if count < 0:
            raise ValueError(f"byte count = {count}: must be >= 0")
        out = bytearray()
        while len(out) < count:
            if self._left == 0:
                self._rekey()
            take = min(-(-(count - len(out)) // _BLOCK) * _BLOCK, self._left)
            out += self._encryptor.update(bytes(take))
            self._left -= take
        del out[count:]
        return out

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 uniforms in (0, 1], 53 random bits each."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        words = torch.frombuffer(self.read(8 * count), dtype=torch.int64)
        top53 = torch.bitwise_right_shift(words, 11) & ((1 << 53) - 1)
        return (top53.to(torch.float64) + 1.0) * _U53

    def bernoulli(self, count: int, p: float) -> torch.Tensor:
        """``count`` independent secret coin flips with ``P(True) = p`` (bool)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability = {p}: must be in [0, 1]")
        return self.uniform(count) <= p
