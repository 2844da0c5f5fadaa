"""Masks: pseudorandom ring vectors expanded from 32-byte seeds.

A mask must be indistinguishable from uniform over ``Z_{2^bits}^P`` for
anyone without the seed, so it is the keystream of AES-256 in counter mode
(NIST SP 800-38A) under the seed as key, read as little-endian words and
reduced modulo ``2^bits``: every output bit is a keystream bit, so the words
are uniform. Each seed is fresh per round (an X25519 agreement over fresh
keys, or ``secrets.token_bytes``), so a zero IV never repeats a
(key, counter) pair. Flower's SecAgg+ instead seeds numpy's generator with a
32-bit value, which 2^32 guesses recover.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedtrain.secure.quantize import Ring

SEED_BYTES = 32
_ZERO_IV = bytes(16)
_AES_BLOCK = 16


def expand(seed: bytes, length: int, ring: Ring) -> np.ndarray:
    """The mask of ``length`` ring elements that ``seed`` stands for."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed of {len(seed)} bytes: must be {SEED_BYTES}")
    if length < 0:
        raise ValueError(f"mask length = {length}: must be >= 0")
    nbytes = length * ring.itemsize
    out = bytearray(nbytes + _AES_BLOCK - 1)
    stream = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    stream.update_into(bytes(nbytes), out)
    mask = np.frombuffer(out, dtype=np.dtype(ring.dtype).newbyteorder("<"), count=length).astype(ring.dtype, copy=False)
    return ring.reduce_(mask)


def add_mask_(target: np.ndarray, seed: bytes, ring: Ring, sign: int) -> np.ndarray:
    """``target ± expand(seed)`` in the ring, in place (``sign`` is +1 or −1)."""
    if sign not in (1, -1):
        raise ValueError(f"sign = {sign}: must be +1 or -1")
    mask = expand(seed, target.shape[0], ring)
    if sign == 1:
        np.add(target, mask, out=target)
    else:
        np.subtract(target, mask, out=target)
    return ring.reduce_(target)
