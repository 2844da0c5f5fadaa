"""The byte encoding of the secure-aggregation stage messages, for a deployment.

What crosses the network between coordinator and clients must be decoded
without trusting it: unpickling bytes from the network runs whatever code
they name. Every message of :mod:`fedtrain.secure.messages` is therefore
encoded as UTF-8 JSON, ``{"message": <class name>, "body": {...}}``, driven
by the dataclass's own field types:

* ``int`` and ``float`` as JSON numbers (a ``bool`` is not an ``int``; NaN and
  infinities are refused);
* ``bytes`` as standard base64 text;
* a numpy array (a masked vector) as ``{"dtype": "<u4" | "<u8", "data":
  base64}``: raw little-endian ring elements, decoded into a fresh array;
* ``tuple[X, ...]`` as a JSON list, a nested dataclass as an object with
  exactly its field names.

:func:`decode` is told which message it expects and raises ``ValueError``
naming the field for anything else: bad UTF-8 or JSON, another message,
missing or extra fields, a wrong type, invalid base64, an unknown dtype, or
values the dataclass itself refuses (a :class:`SecureSetup` that could
overflow, a Shamir share outside the field). A deployment treats that client
as malformed and leaves it out of the round.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import typing
from typing import Any, TypeVar

import numpy as np

from fedtrain.secure.messages import (
    AdvertiseRequest,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    OwnedShare,
    SecureSetup,
    ShareDelivery,
    SharedKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtrain.secure.shamir import Share

WIRE_MESSAGES: tuple[type, ...] = (
    AdvertiseRequest,
    KeyAdvert,
    Neighbourhood,
    SharedKeys,
    ShareDelivery,
    MaskedInput,
    UnmaskRequest,
    UnmaskResponse,
)
"""The messages a deployment sends, in the order of a round."""

ARRAY_DTYPES: dict[str, np.dtype[Any]] = {"<u4": np.dtype("<u4"), "<u8": np.dtype("<u8")}
"""Array encodings accepted on the wire: the ring's ``uint32`` and ``uint64``."""

_NESTED: tuple[type, ...] = (SecureSetup, EncryptedShare, OwnedShare, Share)

M = TypeVar("M")


def encode(message: object) -> bytes:
    """``message`` (one of :data:`WIRE_MESSAGES`) as UTF-8 JSON bytes."""
    if type(message) not in WIRE_MESSAGES:
        allowed = ", ".join(t.__name__ for t in WIRE_MESSAGES)
        raise TypeError(f"encode: a {type(message).__name__} is not a wire message; allowed: {allowed}")
    envelope = {"message": type(message).__name__, "body": _to_json(message, type(message), "")}
    return json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode(data: bytes, expected: type[M]) -> M:
    """The ``expected`` message encoded in ``data``; ``ValueError`` saying what
    is wrong with anything else."""
    if expected not in WIRE_MESSAGES:
        allowed = ", ".join(t.__name__ for t in WIRE_MESSAGES)
        raise TypeError(f"decode: expected = {expected.__name__} is not a wire message; allowed: {allowed}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{expected.__name__}: payload is a {type(data).__name__}, expected bytes")
    try:
        envelope = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"{expected.__name__}: payload is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{expected.__name__}: payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"message", "body"}:
        raise ValueError(f"{expected.__name__}: payload must be an object with keys 'message' and 'body'")
    if envelope["message"] != expected.__name__:
        raise ValueError(f"payload is a {envelope['message']!r} message, expected {expected.__name__!r}")
    try:
        return typing.cast(M, _from_json(envelope["body"], expected, expected.__name__))
    except RecursionError:
        raise ValueError(f"{expected.__name__}: payload is nested too deeply") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _to_json(value: Any, hint: Any, where: str) -> Any:
    if hint is bytes:
        return base64.b64encode(value).decode("ascii")
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    if hint is np.ndarray:
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<")
        if dtype.str not in ARRAY_DTYPES:
            raise TypeError(f"{where}: arrays of {array.dtype} cannot be sent; allowed: uint32, uint64")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        return {"dtype": dtype.str, "data": base64.b64encode(data).decode("ascii")}
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return [_to_json(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        return {f.name: _to_json(getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
                for f in dataclasses.fields(hint)}
    raise TypeError(f"{where}: cannot encode a field of type {hint}")


def _from_json(value: Any, hint: Any, where: str) -> Any:
    if hint is bytes:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected base64 text, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: invalid base64") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is np.ndarray:
        return _array(value, where)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        item = typing.get_args(hint)[0]
        return tuple(_from_json(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint) and (hint in WIRE_MESSAGES or hint in _NESTED):
        names = [f.name for f in dataclasses.fields(hint)]
        if not isinstance(value, dict) or set(value) != set(names):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where}: expected an object with fields {names}, got {got}")
        hints = _hints(hint)
        fields = {n: _from_json(value[n], hints[n], f"{where}.{n}") for n in names}
        try:
            return hint(**fields)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    raise ValueError(f"{where}: cannot decode a field of type {hint}")


def _array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "data"}:
        raise ValueError(f"{where}: expected an object with fields ['dtype', 'data']")
    dtype = ARRAY_DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where}.dtype = {value['dtype']!r}: allowed: {sorted(ARRAY_DTYPES)}")
    raw = _from_json(value["data"], bytes, f"{where}.data")
    if len(raw) % dtype.itemsize:
        raise ValueError(f"{where}.data: {len(raw)} bytes is not a whole number of {dtype.itemsize}-byte elements")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
