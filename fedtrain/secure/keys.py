"""Key agreement and authenticated encryption for secure aggregation, all from
the ``cryptography`` package.

Every client makes two fresh X25519 key pairs per round (Bonawitz et al.
2017, §4): one whose Diffie–Hellman secret with a neighbour seeds their
pairwise mask, one whose secret encrypts the Shamir shares the coordinator
forwards between them. The raw X25519 output is never used directly: HKDF
(RFC 5869, SHA-256) derives a 32-byte key from it, bound to the protocol
session and the purpose, so the two uses can never collide.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
"""X25519 key length and the length of every derived key (RFC 7748)."""

NONCE_BYTES = 12
"""AES-GCM nonce length recommended by NIST SP 800-38D."""


class Purpose(bytes, enum.Enum):
    """The HKDF ``info`` label of each derived key (domain separation)."""

    MASK = b"fedtrain/secagg/pairwise-mask"
    SHARES = b"fedtrain/secagg/share-encryption"


@dataclass(frozen=True)
class KeyPair:
    """A fresh X25519 key pair (the private half never leaves the client
    except as Shamir shares)."""

    key: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> "KeyPair":
        """A fresh key pair from the operating system's CSPRNG."""
        key = X25519PrivateKey.generate()
        return cls(key=key, public=_raw_public(key))

    @property
    def private(self) -> bytes:
        """The raw 32-byte private key, the secret that is Shamir-shared."""
        return self.key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key(private: bytes) -> X25519PrivateKey:
    """The X25519 key of 32 raw private bytes (e.g. reconstructed from shares)."""
    return X25519PrivateKey.from_private_bytes(private)


def public_of(private: X25519PrivateKey) -> bytes:
    """The raw public key of an X25519 private key."""
    return _raw_public(private)


def agree(private: X25519PrivateKey, peer_public: bytes, session: bytes, purpose: Purpose) -> bytes:
    """The 32-byte key that ``private`` and the owner of ``peer_public`` share,
    for ``purpose`` within ``session``: HKDF-SHA256 of the X25519 secret.

    Symmetric: ``agree(a.key, b.public, …) == agree(b.key, a.public, …)``.
    Raises ``ValueError`` for a malformed or low-order public key.
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"public key of {len(peer_public)} bytes: must be {KEY_BYTES}")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=purpose.value).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM encryption under a fresh random nonce; returns ``(nonce, ciphertext)``.

    The same pairwise key encrypts in both directions, so the nonce is random
    (96 bits from :mod:`secrets`), never a counter. That is safe because a
    share key lives for one round (fresh X25519 pairs, salted with the
    round's session id) and seals exactly two messages, one share pair each
    way: a nonce collision has probability 2^−96, far inside NIST SP 800-38D
    §8.3's limit of 2^32 random-nonce messages per key.
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`; raises ``ValueError`` when it was not
    sealed under ``key`` with ``associated`` or was altered."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce of {len(nonce)} bytes: must be {NONCE_BYTES}")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise ValueError("share ciphertext failed authentication (wrong key, sender or tampering)") from None
