"""Masks: pseudorandom ring vectors expanded from 32-byte seeds.

A mask must be indistinguishable from uniform over ``Z_{2^bits}^P`` for
anyone without the seed, so it is the keystream of AES-256 in counter mode
(NIST SP 800-38A) under the seed as key, read as little-endian words and
reduced modulo ``2^bits``: every output bit is a keystream bit, so the words
are uniform. Flower's SecAgg+ instead seeds numpy's generator with a 32-bit
value, which 2^32 guesses recover.

Why a fixed all-zero initial counter block is safe here: CTR mode is secure
as long as no (key, counter block) pair encrypts two different things
(SP 800-38A, Appendix B), and each key here expands exactly one keystream,
starting at block 0, once per round:

* a self-mask seed ``b_u`` is 32 bytes from :mod:`secrets`, drawn fresh for
  each round and each client;
* a pairwise seed ``s_uv`` is HKDF-SHA256 (RFC 5869) of the X25519 agreement
  of two key pairs generated fresh for the round, salted with the round's
  random session id and labelled :attr:`~fedtrain.secure.keys.Purpose.MASK`,
  distinct from the :attr:`~fedtrain.secure.keys.Purpose.SHARES` label of
  the share-encryption key, so no mask key is ever an AES-GCM key.

``u`` and ``v`` both expand ``s_uv`` into the same keystream, on purpose: one
adds it and the other subtracts it, so it cancels in the sum (the
coordinator re-expands it only to remove the mask of a dropped client). That
is one stream used twice with opposite signs, never one key stretched over
two different streams. A stream is at most ``P + 1`` ring words of 4 or 8
bytes, far below the ``2^128`` blocks at which the 128-bit counter wraps.
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
