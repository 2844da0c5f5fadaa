"""The byte encoding of secure-aggregation messages (fedtrain.secure.wire):
every stage message of a real protocol run survives a round trip, the
protocol completes over encoded messages, and malformed bytes raise
ValueError, never anything a coordinator would crash on."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import numpy as np
import pytest

from fedtrain.secure import wire
from fedtrain.secure.graph import NeighbourGraph
from fedtrain.secure.messages import (
    AdvertiseRequest,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    SecureSetup,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtrain.secure.protocol import SecureClient, SecureServer


def _same(a: Any, b: Any) -> bool:
    """Field-by-field equality, arrays compared by dtype, shape and values."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return type(a) is type(b) and a == b


def _trip(message: Any) -> Any:
    data = wire.encode(message)
    assert isinstance(data, bytes)
    back = wire.decode(data, type(message))
    assert _same(message, back), type(message).__name__
    return back


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_every_stage_message_round_trips_and_the_protocol_completes_over_the_wire(bits: int) -> None:
    n, length, max_weight = 4, 7, 50
    setup = SecureSetup(secrets.token_bytes(16), n, length, bits, 2.0, max_weight, 2, noise_stddev=0.0)
    server = SecureServer(setup, NeighbourGraph.harary(n, 3))
    rng = np.random.default_rng(0)
    updates = rng.uniform(-1, 1, size=(n, length)).astype(np.float32)
    weights = [3, 10, 50, 1]

    clients = [SecureClient(_trip(AdvertiseRequest(i, setup)).recipient, setup) for i in range(n)]
    hoods = server.collect_adverts([_trip(c.advertise()) for c in clients])
    deliveries = server.collect_shares([_trip(c.share_keys(_trip(hoods[c.index]))) for c in clients])
    masked = [
        _trip(c.masked_input(_trip(deliveries[c.index]), updates[c.index], weights[c.index])) for c in clients
    ]
    assert all(m.vector.dtype == setup.ring.dtype and m.vector.flags.writeable for m in masked)
    requests = server.collect_masked(masked)
    result = server.collect_unmask([_trip(c.unmask(_trip(requests[c.index]))) for c in clients])

    expected = sum(updates[i].astype(np.float64) * (weights[i] / max_weight) for i in range(n))
    assert result.weight == sum(weights)
    np.testing.assert_allclose(result.total, expected, atol=setup.quantizer.sum_error_bound(n) + 1e-12)


def test_setup_with_noise_and_empty_tuples_round_trip() -> None:
    setup = SecureSetup(secrets.token_bytes(16), 3, 0, 32, 8.0, 1, 1, noise_stddev=0.125)
    _trip(AdvertiseRequest(2, setup))
    _trip(Neighbourhood(0, ()))
    _trip(ShareDelivery(1, ()))
    _trip(UnmaskRequest(1, (), ()))
    _trip(UnmaskResponse(1, (), ()))
    _trip(MaskedInput(0, np.zeros(0, dtype=np.uint32)))


def _advert_json() -> dict[str, Any]:
    advert = KeyAdvert(1, secrets.token_bytes(32), secrets.token_bytes(32))
    return json.loads(wire.encode(advert))


def _masked_json() -> dict[str, Any]:
    return json.loads(wire.encode(MaskedInput(0, np.arange(5, dtype=np.uint32))))


def _dump(row: Any) -> bytes:
    return json.dumps(row).encode()


def _edit(row: dict[str, Any], path: list[str], value: Any) -> bytes:
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _dump(row)


MALFORMED: dict[str, tuple[bytes, type]] = {
    "empty": (b"", KeyAdvert),
    "not utf-8": (b"\xff\xfe\x00", KeyAdvert),
    "not json": (b"{'message': 1}", KeyAdvert),
    "a pickle": (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", KeyAdvert),
    "json list": (b"[1, 2]", KeyAdvert),
    "no body": (b'{"message": "KeyAdvert"}', KeyAdvert),
    "extra envelope key": (b'{"message": "KeyAdvert", "body": {}, "x": 1}', KeyAdvert),
    "another message": (_dump({**_advert_json(), "message": "SharedKeys"}), KeyAdvert),
    "missing field": (_dump({"message": "KeyAdvert", "body": {"sender": 1, "mask_public": ""}}), KeyAdvert),
    "extra field": (_edit(_advert_json(), ["body", "extra"], 1), KeyAdvert),
    "bool as int": (_edit(_advert_json(), ["body", "sender"], True), KeyAdvert),
    "float as int": (_edit(_advert_json(), ["body", "sender"], 1.5), KeyAdvert),
    "string as int": (_edit(_advert_json(), ["body", "sender"], "1"), KeyAdvert),
    "bad base64": (_edit(_advert_json(), ["body", "mask_public"], "not base64!"), KeyAdvert),
    "int as bytes": (_edit(_advert_json(), ["body", "mask_public"], 7), KeyAdvert),
    "unknown dtype": (_edit(_masked_json(), ["body", "vector", "dtype"], "<f8"), MaskedInput),
    "object dtype": (_edit(_masked_json(), ["body", "vector", "dtype"], "|O"), MaskedInput),
    "ragged array": (
        _edit(_masked_json(), ["body", "vector", "data"], base64.b64encode(b"\x00" * 7).decode()), MaskedInput
    ),
    "array not an object": (_edit(_masked_json(), ["body", "vector"], [1, 2, 3]), MaskedInput),
    "nan": (b'{"message": "UnmaskRequest", "body": {"recipient": NaN, "survivors": [], "dropped": []}}',
            UnmaskRequest),
    "tuple not a list": (
        b'{"message": "UnmaskRequest", "body": {"recipient": 1, "survivors": 3, "dropped": []}}', UnmaskRequest
    ),
    "share outside the field": (
        _dump({"message": "UnmaskResponse", "body": {"sender": 0, "key_shares": [], "seed_shares": [
            {"owner": 1, "share": {"x": 1, "y": 2**600}}]}}),
        UnmaskResponse,
    ),
    "share point zero": (
        _dump({"message": "UnmaskResponse", "body": {"sender": 0, "key_shares": [], "seed_shares": [
            {"owner": 1, "share": {"x": 0, "y": 5}}]}}),
        UnmaskResponse,
    ),
    "deep nesting": (b'{"message": "UnmaskRequest", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     UnmaskRequest),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_raise_value_error(case: str) -> None:
    data, expected = MALFORMED[case]
    with pytest.raises(ValueError):
        wire.decode(data, expected)


def test_setup_the_dataclass_refuses_is_a_value_error() -> None:
    setup = SecureSetup(secrets.token_bytes(16), 3, 4, 32, 8.0, 10, 1)
    row = json.loads(wire.encode(AdvertiseRequest(0, setup)))
    for field, value in (("session", base64.b64encode(b"short").decode()), ("num_clients", 0),
                         ("bits", 7), ("max_weight", 2**40), ("clip_range", -1.0), ("noise_stddev", -0.5)):
        bad = json.loads(json.dumps(row))
        bad["body"]["setup"][field] = value
        with pytest.raises(ValueError, match=field.split("_")[0]):
            wire.decode(_dump(bad), AdvertiseRequest)


def test_big_endian_arrays_are_sent_little_endian() -> None:
    vector = np.arange(4, dtype=">u4")
    back = wire.decode(wire.encode(MaskedInput(2, vector)), MaskedInput)
    assert back.vector.dtype == np.dtype("=u4") and back.vector.tolist() == [0, 1, 2, 3]


def test_only_wire_messages_are_encoded() -> None:
    with pytest.raises(TypeError, match="not a wire message"):
        wire.encode(object())
    with pytest.raises(TypeError, match="allowed"):
        wire.encode(MaskedInput(0, np.zeros(3, dtype=np.float32)))
