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
        size = -(-count // _BLOCK) * _BLOCK
        out = bytearray(size)
        view = memoryview(out)
        done = 0
        while done < size:
            if self._left == 0:
                self._rekey()
            take = min(size - done, self._left)
            # the keystream is the encryption of zeros, written straight into the result (no copies)
            self._encryptor.update_into(bytes(take), view[done : done + take])
            self._left -= take
            done += take
        view.release()
        del out[count:]
        return out

    def words(self, count: int) -> torch.Tensor:
        """The next ``count`` 64-bit words of the stream (CPU, ``int64``):
        the raw bits :meth:`uniform` is made of, for a device that turns
        them into uniforms itself (:func:`uniform_from_words`)."""
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(self.read(8 * count), dtype=torch.int64)

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 uniforms in (0, 1], 53 random bits each."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        return uniform_from_words(self.words(count))

    def bernoulli(self, count: int, p: float) -> torch.Tensor:
        """``count`` independent secret coin flips with ``P(True) = p`` (bool)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability = {p}: must be in [0, 1]")
        return self.uniform(count) <= p


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in (0, 1] from 64-bit words (``int64``), on the
    words' device: the top 53 bits of each, plus one, times 2^-53, so every
    value is a multiple of 2^-53 and exactly representable. A public,
    deterministic transform: the randomness is all in the words."""
    top53 = torch.bitwise_right_shift(words, 11).bitwise_and_((1 << 53) - 1)
    return top53.to(torch.float64).add_(1.0).mul_(_U53)
