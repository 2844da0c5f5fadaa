"""The messages of one secure-aggregation round, as plain frozen dataclasses.

Every field is ``bytes``, ``int``, ``float``, a tuple of these, or a numpy
unsigned-integer array, so any transport can carry them: the simulation hands
them over in process, a deployment serialises them into Flower messages. The
round has four stages (Bonawitz et al. 2017, Fig. 4; the consistency-check
stage of their actively secure variant is not implemented):

==================  =========================  ==========================
stage               client → coordinator       coordinator → client
==================  =========================  ==========================
advertise keys      :class:`KeyAdvert`         :class:`Neighbourhood`
share keys          :class:`SharedKeys`        :class:`ShareDelivery`
masked input        :class:`MaskedInput`       :class:`UnmaskRequest`
unmask              :class:`UnmaskResponse`    (the sum is the coordinator's)
==================  =========================  ==========================

Before the first stage the coordinator sends every client the round's public
:class:`SecureSetup` and its index, as an :class:`AdvertiseRequest`.
:mod:`fedtrain.secure.wire` encodes these messages as bytes for a deployment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fedtrain.secure.quantize import Quantizer, Ring
from fedtrain.secure.shamir import SHARE_BYTES, Share

SESSION_BYTES = 16
INDEX_BYTES = 4
"""Bytes of a client index or count on the wire (:func:`wire_bytes`)."""


@dataclass(frozen=True)
class SecureSetup:
    """The public parameters of one protocol run.

    ``num_clients`` clients (indices ``0 … n−1``) take part; each contributes
    a vector of ``vector_length`` values plus its weight in ``1 …
    max_weight``. ``noise_stddev`` is the std of the Gaussian noise *each*
    client adds to its contribution (distributed DP; 0 = none).
    """

    session: bytes
    num_clients: int
    vector_length: int
    bits: int
    clip_range: float
    max_weight: int
    threshold: int
    noise_stddev: float = 0.0

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_BYTES:
            raise ValueError(f"session of {len(self.session)} bytes: must be {SESSION_BYTES}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients = {self.num_clients}: must be >= 1")
        if self.vector_length < 0:
            raise ValueError(f"vector_length = {self.vector_length}: must be >= 0")
        if self.max_weight < 1:
            raise ValueError(f"max_weight = {self.max_weight}: must be >= 1")
        if self.threshold < 1:
            raise ValueError(f"threshold = {self.threshold}: must be >= 1")
        if not (math.isfinite(self.noise_stddev) and self.noise_stddev >= 0):
            raise ValueError(f"noise_stddev = {self.noise_stddev}: must be a finite number >= 0")
        ring = Ring(self.bits)
        if self.num_clients * self.max_weight > ring.max_signed:
            raise ValueError(
                f"max_weight = {self.max_weight}: {self.num_clients} clients could sum to "
                f"{self.num_clients * self.max_weight} > {ring.max_signed}, overflowing Z_2^{self.bits}"
            )
        Quantizer(ring, self.clip_range, self.num_clients)

    @property
    def ring(self) -> Ring:
        return Ring(self.bits)

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.ring, self.clip_range, self.num_clients)

    @property
    def masked_length(self) -> int:
        """Ring elements of a masked input: the vector and the weight."""
        return self.vector_length + 1


@dataclass(frozen=True)
class AdvertiseRequest:
    """Opens a client's round: its index among the round's clients and the
    round's public parameters; the answer is a :class:`KeyAdvert`."""

    recipient: int
    setup: SecureSetup


@dataclass(frozen=True)
class KeyAdvert:
    """A client's two fresh X25519 public keys (mask agreement, share encryption)."""

    sender: int
    mask_public: bytes
    share_public: bytes


@dataclass(frozen=True)
class Neighbourhood:
    """The adverts of the recipient's neighbours that advertised."""

    recipient: int
    peers: tuple[KeyAdvert, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of the sender's seed and mask key for one recipient, AES-GCM
    sealed under their pairwise share key; the coordinator only routes it."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class SharedKeys:
    """A client's sealed shares for each neighbour, and SHA-256 commitment to
    its self-mask seed (lets the coordinator detect wrong seed shares)."""

    sender: int
    seed_commitment: bytes
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareDelivery:
    """The sealed shares addressed to the recipient, from neighbours that shared;
    their senders are the neighbours the recipient masks with."""

    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A client's masked contribution: ``masked_length`` ring elements."""

    sender: int
    vector: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Which of the recipient's mask peers finished (reveal their seed shares)
    and which dropped (reveal their mask-key shares); never both for one client."""

    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class OwnedShare:
    """A Shamir share of ``owner``'s secret."""

    owner: int
    share: Share


@dataclass(frozen=True)
class UnmaskResponse:
    """The shares an :class:`UnmaskRequest` asked for."""

    sender: int
    seed_shares: tuple[OwnedShare, ...]
    key_shares: tuple[OwnedShare, ...]


@dataclass(frozen=True, eq=False)
class AggregateSum:
    """What the coordinator learns: the dequantised sum of the survivors'
    contributions (``float64``), their summed weight, who is in it, and every
    client left out with the reason."""

    total: np.ndarray
    weight: int
    contributors: tuple[int, ...]
    excluded: tuple[tuple[int, str], ...]


def wire_bytes(message: object) -> int:
    """Payload bytes of ``message`` in a compact binary encoding: ``bytes`` as
    is, ints as 4-byte indices except share values (66 bytes), arrays as
    their buffer, floats as 8 bytes. Framing and field tags are not counted."""
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    if isinstance(message, np.ndarray):
        return int(message.nbytes)
    if isinstance(message, Share):
        return INDEX_BYTES + SHARE_BYTES
    if isinstance(message, bool) or isinstance(message, int):
        return INDEX_BYTES
    if isinstance(message, float):
        return 8
    if isinstance(message, tuple):
        return INDEX_BYTES + sum(wire_bytes(m) for m in message)
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return sum(wire_bytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    raise TypeError(f"wire_bytes: cannot size a {type(message).__name__}")
