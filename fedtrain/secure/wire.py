"""The byte encoding of the secure-aggregation stage messages, for a deployment.

What crosses the network between coordinator and clients must be decoded
without trusting it: unpickling bytes from the network runs whatever code
they name. Every message of :mod:`fedtrain.secure.messages` is therefore
encoded in a small binary format driven by the dataclass's own field types,
in field order, with nothing of Python in it:

* a frame: :data:`MAGIC`, then one byte, the message's index in
  :data:`WIRE_MESSAGES`, then the message's fields, and nothing after them;
* ``int``: one byte ``L`` (1 … :data:`MAX_INT_BYTES`), then ``L`` bytes of
  two's complement, little-endian;
* ``float``: 8 bytes of IEEE 754 binary64, little-endian; NaN and infinities
  are refused;
* ``bytes``: a 4-byte little-endian length, then the bytes as they are;
* a numpy array (a masked vector): one byte, its element size (4: ``<u4``,
  8: ``<u8``), an 8-byte little-endian element count, then the raw
  little-endian ring elements, decoded into a fresh array;
* ``tuple[X, ...]``: a 4-byte little-endian count, then the items; a nested
  dataclass: its fields.

A masked vector therefore costs its raw bytes plus 16 (magic, message,
sender, element size and count), where base64 in JSON cost 1.33×. :func:`decode` is told which message it expects and raises
``ValueError`` naming the field for anything else: another magic or
message, a length or count that runs past the end (checked before anything
is allocated), bytes left over, an unknown element size, a non-finite
float, or values the dataclass itself refuses (a :class:`SecureSetup` that
could overflow, a Shamir share outside the field). A deployment treats that
client as malformed and leaves it out of the round.
"""

from __future__ import annotations

import dataclasses
import math
import struct
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

ARRAY_DTYPES: dict[int, np.dtype[Any]] = {4: np.dtype("<u4"), 8: np.dtype("<u8")}
"""Array encodings accepted on the wire, by element size: the ring's ``uint32`` and ``uint64``."""

MAGIC = b"FTW1"
"""The first bytes of every encoded message (format version 1)."""

MAX_INT_BYTES = 80
"""Longest integer on the wire: a Shamir share of the 521-bit field needs 66 bytes."""

_NESTED: tuple[type, ...] = (SecureSetup, EncryptedShare, OwnedShare, Share)

M = TypeVar("M")


def encode(message: object) -> bytes:
    """``message`` (one of :data:`WIRE_MESSAGES`) as one binary frame."""
    if type(message) not in WIRE_MESSAGES:
        allowed = ", ".join(t.__name__ for t in WIRE_MESSAGES)
        raise TypeError(f"encode: a {type(message).__name__} is not a wire message; allowed: {allowed}")
    out: list[bytes] = [MAGIC, bytes([WIRE_MESSAGES.index(type(message))])]
    _put(out, message, type(message), type(message).__name__)
    return b"".join(out)


def decode(data: bytes, expected: type[M]) -> M:
    """The ``expected`` message encoded in ``data``; ``ValueError`` saying what
    is wrong with anything else."""
    if expected not in WIRE_MESSAGES:
        allowed = ", ".join(t.__name__ for t in WIRE_MESSAGES)
        raise TypeError(f"decode: expected = {expected.__name__} is not a wire message; allowed: {allowed}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{expected.__name__}: payload is a {type(data).__name__}, expected bytes")
    view = memoryview(data).cast("B")
    if bytes(view[:len(MAGIC)]) != MAGIC or len(view) <= len(MAGIC):
        raise ValueError(f"{expected.__name__}: payload is not a fedtrain wire message (no {MAGIC!r} header)")
    index = view[len(MAGIC)]
    if index >= len(WIRE_MESSAGES) or WIRE_MESSAGES[index] is not expected:
        got = WIRE_MESSAGES[index].__name__ if index < len(WIRE_MESSAGES) else f"unknown message #{index}"
        raise ValueError(f"payload is a {got!r} message, expected {expected.__name__!r}")
    reader = _Reader(view, len(MAGIC) + 1)
    message = _get(reader, expected, expected.__name__)
    if reader.pos != len(view):
        raise ValueError(f"{expected.__name__}: {len(view) - reader.pos} bytes left over after the message")
    return typing.cast(M, message)


def _put(out: list[bytes], value: Any, hint: Any, where: str) -> None:
    if hint is bytes:
        out += [struct.pack("<I", len(value)), bytes(value)]
    elif hint is int:
        number = int(value)
        size = max(1, (number.bit_length() + 8) // 8)
        if size > MAX_INT_BYTES:
            raise TypeError(f"{where}: {size}-byte integer; at most {MAX_INT_BYTES} bytes travel")
        out += [bytes([size]), number.to_bytes(size, "little", signed=True)]
    elif hint is float:
        out.append(struct.pack("<d", float(value)))
    elif hint is np.ndarray:
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<")
        if array.ndim != 1 or dtype.kind != "u" or dtype.itemsize not in ARRAY_DTYPES:
            raise TypeError(f"{where}: arrays of {array.dtype} cannot be sent; allowed: 1-D uint32, uint64")
        out += [struct.pack("<BQ", dtype.itemsize, array.size), np.ascontiguousarray(array, dtype=dtype).tobytes()]
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        out.append(struct.pack("<I", len(value)))
        for i, v in enumerate(value):
            _put(out, v, item, f"{where}[{i}]")
    elif dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        for f in dataclasses.fields(hint):
            _put(out, getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
    else:
        raise TypeError(f"{where}: cannot encode a field of type {hint}")


class _Reader:
    """A position in a frame being decoded; every read checks it stays inside."""

    def __init__(self, view: memoryview, pos: int) -> None:
        self.view = view
        self.pos = pos

    def take_(self, size: int, where: str) -> memoryview:
        if size > len(self.view) - self.pos:
            raise ValueError(f"{where}: needs {size} bytes, only {len(self.view) - self.pos} left")
        chunk = self.view[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def unpack_(self, fmt: str, where: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take_(struct.calcsize(fmt), where))


def _get(reader: _Reader, hint: Any, where: str) -> Any:
    if hint is bytes:
        (size,) = reader.unpack_("<I", where)
        return bytes(reader.take_(size, where))
    if hint is int:
        size = reader.take_(1, where)[0]
        if not 1 <= size <= MAX_INT_BYTES:
            raise ValueError(f"{where}: integer of {size} bytes; allowed: 1 … {MAX_INT_BYTES}")
        return int.from_bytes(reader.take_(size, where), "little", signed=True)
    if hint is float:
        (number,) = reader.unpack_("<d", where)
        if not math.isfinite(number):
            raise ValueError(f"{where}: expected a finite number, got {number!r}")
        return number
    if hint is np.ndarray:
        return _array(reader, where)
    if typing.get_origin(hint) is tuple:
        (count,) = reader.unpack_("<I", where)
        if count > len(reader.view) - reader.pos:
            raise ValueError(f"{where}: {count} items cannot fit in the {len(reader.view) - reader.pos} bytes left")
        item = typing.get_args(hint)[0]
        return tuple(_get(reader, item, f"{where}[{i}]") for i in range(count))
    if dataclasses.is_dataclass(hint) and (hint in WIRE_MESSAGES or hint in _NESTED):
        hints = _hints(hint)
        fields = {f.name: _get(reader, hints[f.name], f"{where}.{f.name}") for f in dataclasses.fields(hint)}
        try:
            return hint(**fields)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    raise ValueError(f"{where}: cannot decode a field of type {hint}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _array(reader: _Reader, where: str) -> np.ndarray:
    itemsize, count = reader.unpack_("<BQ", where)
    dtype = ARRAY_DTYPES.get(itemsize)
    if dtype is None:
        raise ValueError(f"{where}: element size {itemsize}; allowed: {sorted(ARRAY_DTYPES)} (uint32, uint64)")
    if count > (len(reader.view) - reader.pos) // itemsize:
        raise ValueError(
            f"{where}: {count} elements of {itemsize} bytes do not fit in the {len(reader.view) - reader.pos} bytes left"
        )
    raw = reader.take_(count * itemsize, where)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
