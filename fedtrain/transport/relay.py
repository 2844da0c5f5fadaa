"""What passes between fedtrain's Flower ``ClientApp`` relay
(:mod:`fedtrain.transport.flower_client_app`) and the client's warm worker,
which ``fedtrain client`` runs behind a Unix socket: the requests, the
answers, the node-config keys that tell the relay where the worker is, and
the relay's call itself (HMAC-authenticated with the worker's random key).

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

AUTHKEY_BYTES = 32
"""256-bit key for the relay's HMAC challenge (``multiprocessing.connection``)."""


class RequestKind(enum.Enum):
    """What the relay asks of the worker: the first element of a request."""

    HELLO = "hello"
    """Body: the :class:`Hello` as JSON; answer: :class:`ClientInfo`."""
    TRAIN = "train"
    """Body: ``(round, task JSON, flat global model)``; answer: :class:`TrainReply`."""
    TRAIN_SECURE = "train_secure"
    """Body: ``(round, task JSON, flat global model, encoded AdvertiseRequest)``:
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


@dataclass(frozen=True)
class TrainReply:
    """One round's result of a deployed client."""

    update: np.ndarray
    num_examples: int
    metrics: dict[str, float]


def relay(address: str, authkey_hex: str, request: tuple[RequestKind, Any]) -> tuple[str, Any]:
    """Send ``request`` to the worker at ``address`` and wait for its answer."""
    with Client(address, family="AF_UNIX", authkey=bytes.fromhex(authkey_hex)) as conn:
        conn.send(request)
        return conn.recv()
