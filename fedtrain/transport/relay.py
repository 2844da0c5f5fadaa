"""What passes between fedtrain's Flower ``ClientApp`` relay
(:mod:`fedtrain.transport.flower_client_app`) and the client's warm worker,
which ``fedtrain client`` runs behind a Unix socket: the requests, the
answers, the node-config keys that tell the relay where the worker is, and
the relay's call itself (HMAC-authenticated with the worker's random key).

It also holds the tensor format both ends of a deployment put in Flower's
records (:data:`RAW_STYPE`, :func:`raw_bytes`, :func:`raw_vector`): an
``Array`` whose ``data`` is the tensor's raw little-endian bytes, no
``.npy`` header, no base64, no JSON; Flower cuts an ``Array`` into chunks
of 5 MiB itself, so a large model needs nothing more.

This module imports neither torch nor Flower: the relay runs in a fresh
process for every message, so what it imports is paid every round.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from multiprocessing.connection import Client
from typing import Any, Mapping

import numpy as np

NODE_WORKER = "fedtrain-worker"
"""SuperNode ``--node-config`` key: the worker's Unix socket."""

NODE_KEY_FILE = "fedtrain-key-file"
"""SuperNode ``--node-config`` key: the file (0600) holding the worker's key."""

DEFAULT_POLL = 0.1
"""Seconds between a waiting party's requests (coordinator for replies,
SuperNode for messages, a SuperNode's SuperExec for tasks); a SuperNode
with no message for a while backs off from it
(``fedtrain.deploy.flower.IdlePoll``), and the SuperLink's SuperExec, with
one task per run, asks every second.
Flower's defaults (3 s, 3 s, 1 s) cost seconds of latency per round;
``--poll 3`` restores them."""

AUTHKEY_BYTES = 32
"""256-bit key for the relay's HMAC challenge (``multiprocessing.connection``)."""


RAW_STYPE = "fedtrain.raw-le"
"""The ``stype`` of a Flower ``Array`` that fedtrain sends: ``data`` holds
the elements' raw little-endian bytes, exactly ``itemsize × numel`` of them,
in C order; ``dtype`` and ``shape`` say what they are."""


class WireDtype(enum.Enum):
    """The element types a tensor may have on fedtrain's wire (an ``Array``'s
    ``dtype``): the model and updates as ``float32``, the secure-aggregation
    messages (:mod:`fedtrain.secure.wire`) as ``uint8``."""

    FLOAT32 = "float32"
    UINT8 = "uint8"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The little-endian numpy dtype of the elements."""
        return np.dtype("<f4") if self is WireDtype.FLOAT32 else np.dtype("u1")


def raw_bytes(vector: np.ndarray, dtype: WireDtype) -> bytes:
    """``vector``'s elements as ``dtype``'s raw little-endian bytes (one copy)."""
    return np.ascontiguousarray(vector, dtype=dtype.numpy).tobytes()


def raw_vector(
    name: str, stype: object, dtype: object, shape: object, data: object, expected: WireDtype,
    numel: int | None = None,
) -> np.ndarray:
    """The 1-D vector an ``Array``'s fields (``stype``, ``dtype``, ``shape``,
    ``data``) carry, every field checked where it enters: ``stype`` is
    :data:`RAW_STYPE`, ``dtype`` is ``expected``, ``shape`` one length (equal
    to ``numel`` when given), ``data`` bytes of exactly ``itemsize × length``
    (the declared length is never trusted to allocate). The result is a
    read-only view of ``data``: no copy. Raises ``ValueError`` naming
    ``name``, the value and what is allowed."""
    if stype != RAW_STYPE:
        raise ValueError(f"{name}: stype = {_shown(stype)}: expected {RAW_STYPE!r} (raw little-endian bytes)")
    if dtype != expected.value:
        raise ValueError(f"{name}: dtype = {_shown(dtype)}: expected {expected.value!r}")
    if (not isinstance(shape, tuple) or len(shape) != 1 or isinstance(shape[0], bool)
            or not isinstance(shape[0], int) or shape[0] < 0):
        raise ValueError(f"{name}: shape {_shown(shape)}: expected one length, (n,)")
    if numel is not None and shape[0] != numel:
        raise ValueError(f"{name}: shape ({shape[0]},): expected ({numel},)")
    if not isinstance(data, bytes):
        raise ValueError(f"{name}: data is a {type(data).__name__}: expected bytes")
    itemsize = expected.numpy.itemsize
    if len(data) != itemsize * shape[0]:
        raise ValueError(
            f"{name}: {len(data)} bytes do not hold the {expected.value} vector of shape ({shape[0]},) "
            f"it declares: expected exactly {itemsize} × {shape[0]} = {itemsize * shape[0]} bytes"
        )
    return np.frombuffer(data, dtype=expected.numpy)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


class RequestKind(enum.Enum):
    """What the relay asks of the worker: the first element of a request."""

    HELLO = "hello"
    """Body: the :class:`Hello` as JSON; answer: :class:`ClientInfo`."""
    TRAIN = "train"
    """Body: ``(round, task JSON, flat global model or DownlinkModel)``; answer: :class:`TrainReply`."""
    TRAIN_SECURE = "train_secure"
    """Body: ``(round, task JSON, flat global model or DownlinkModel, encoded AdvertiseRequest)``:
    the worker trains, keeps the update for the round's secure aggregation and
    answers with its encoded ``KeyAdvert`` (bytes)."""
    SECURE = "secure"
    """Body: a :class:`SecureRequest`; answer: the encoded reply message (bytes)."""


class SecureStage(enum.Enum):
    """The stage of a secure-aggregation round a coordinator's message opens
    after training (which carries the first, ``AdvertiseRequest`` →
    ``KeyAdvert``); payload and reply are encoded by :mod:`fedtrain.secure.wire`."""

    SHARE_KEYS = "share_keys"
    """``Neighbourhood`` → ``SharedKeys``."""
    MASKED_INPUT = "masked_input"
    """``ShareDelivery`` → ``MaskedInput``."""
    UNMASK = "unmask"
    """``UnmaskRequest`` → ``UnmaskResponse``."""


@dataclass(frozen=True)
class SecureRequest:
    """One stage message of a secure-aggregation round, as it came from the
    network: ``payload`` is decoded by the worker with the safe decoder of
    :mod:`fedtrain.secure.wire`, never unpickled."""

    round: int
    stage: SecureStage
    payload: bytes


@dataclass(frozen=True)
class Hello:
    """What the coordinator tells a client before its first round: the run's
    config, the model's shape and the coordinator's
    :func:`~fedtrain.layout.frozen_fingerprint` (what the client's frozen
    model must match; the coordinator checks the client's answer)."""

    config: Mapping[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    fingerprint: str = ""

    def as_json(self) -> str:
        return json.dumps({
            "config": self.config, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
        })

    @classmethod
    def from_json(cls, text: str) -> "Hello":
        row = json.loads(text)
        return cls(row["config"], tuple(int(d) for d in row["input_shape"]), int(row["num_classes"]),
                   str(row.get("fingerprint", "")))


@dataclass(frozen=True)
class ClientInfo:
    """A client's answer to :class:`Hello`: the id the engine knows it by,
    its record count (public, as in the simulation), its device and the
    fingerprint of its frozen model (:func:`~fedtrain.layout.frozen_fingerprint`)."""

    name: str
    num_records: int
    device: str
    fingerprint: str


COMPRESSED_BYTES = ("values", "scales", "indices")
"""The fields of :func:`fedtrain.compression.to_wire` that are bytes: in a
training reply each is a ``uint8`` array of record ``compressed``; the
integer fields (``method``, ``numel``, ``block``, ``seed``) are values of its
``result`` record."""

COMPRESSED_INTS = ("method", "numel", "block", "seed")
"""The integer fields of :func:`fedtrain.compression.to_wire`."""


@dataclass(frozen=True)
class DownlinkModel:
    """The global model of a training message under ``compression.down``
    (:class:`fedtrain.compression.ClientCopies`): ``full``, the float32
    model, when the coordinator holds no copy of this client's it can vouch
    for; else ``delta``, the fields of :func:`fedtrain.compression.to_wire`
    (raw little-endian bytes and integers) of the compressed difference
    against the client's copy named ``base``. ``digest`` names the copy after
    it (:func:`fedtrain.compression.copy_digest`), which the worker checks it
    computed bit for bit."""

    digest: str
    full: np.ndarray | None = None
    delta: Mapping[str, bytes | int] | None = None
    base: str = ""


DOWNLINK_KEYS = ("digest", "base")
"""The text fields of a training message's ``downlink`` record; under a
delta it also holds :data:`COMPRESSED_INTS`."""


@dataclass(frozen=True)
class TrainReply:
    """One round's result of a deployed client: the float32 ``update``, or
    under ``compression.up`` an empty ``update`` and ``compressed``, the
    fields of :func:`fedtrain.compression.to_wire` (raw little-endian bytes
    and integers), which the relay sends as ``uint8`` arrays and config
    values."""

    update: np.ndarray
    num_examples: int
    metrics: dict[str, float]
    compressed: Mapping[str, bytes | int] | None = None


def relay(address: str, authkey_hex: str, request: tuple[RequestKind, Any]) -> tuple[str, Any]:
    """Send ``request`` to the worker at ``address`` and wait for its answer."""
    with Client(address, family="AF_UNIX", authkey=bytes.fromhex(authkey_hex)) as conn:
        conn.send(request)
        return conn.recv()
