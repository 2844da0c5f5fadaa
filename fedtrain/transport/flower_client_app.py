"""The Flower ``ClientApp`` of a deployed client: a light relay.

The SuperNode that ``fedtrain client`` runs starts a fresh process for
every message and runs :data:`client_app` in it. Importing torch, loading
the data and building the model there would cost seconds per round, so each
handler only hands the message's content to the client's warm worker over
its authenticated local socket (:func:`fedtrain.transport.relay.relay`; the
socket and the file holding its key are in the SuperNode's node config) and
turns the worker's answer into the reply. This module imports neither torch
nor the coordinator's code.

Messages (Flower's Message API, ``flwr.app``; what the coordinator sends,
:mod:`fedtrain.transport.flower`):

- ``query`` (hello) → reply: the client's id, record count and device;
- ``train`` (the float32 model in record ``params`` or, under
  ``compression.down``, a delta against the client's copy: records ``delta``
  and ``downlink``, :class:`~fedtrain.transport.relay.DownlinkModel`) → reply:
  the flat float32 update (record ``update``) or, under
  ``compression.up``, the compressed one (record ``compressed``: its
  ``values``, ``scales`` and ``indices`` bytes as ``uint8`` arrays, and its
  ``method``, ``numel``, ``block`` and ``seed`` in ``result``), the record
  count and the metrics;
- ``train.secure`` → reply: the client's encoded key advert (the worker
  trains and keeps its update);
- ``query.secure`` → reply: the client's encoded message for the stage.

Tensors arrive and leave as Flower ``Array`` objects of raw little-endian bytes
(:data:`~fedtrain.transport.relay.RAW_STYPE`): the model is checked here
(dtype, one length, exactly 4 bytes per value; the worker then checks the
length against its model) and the update is sent the same way. A worker's
error, or a malformed message, is answered with ``status = "error"`` and the
reason; the payloads of secure messages (array record ``payload``, ``uint8``)
are passed on as bytes and decoded by the worker (:mod:`fedtrain.secure.wire`),
never here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtrain.transport.relay import (
    COMPRESSED_BYTES,
    COMPRESSED_INTS,
    DOWNLINK_KEYS,
    DownlinkModel,
    NODE_KEY_FILE,
    NODE_WORKER,
    RAW_STYPE,
    ClientInfo,
    RequestKind,
    SecureRequest,
    SecureStage,
    TrainReply,
    WireDtype,
    raw_bytes,
    raw_vector,
    relay,
)


def _status_error(reason: str) -> RecordDict:
    return RecordDict({"result": ConfigRecord({"status": "error", "reason": reason})})


def _array(content: RecordDict, name: str, dtype: WireDtype) -> np.ndarray:
    """The vector of ``content``'s array record ``name`` (exactly one raw
    ``Array``, also named ``name``), checked; ``ValueError`` otherwise."""
    record = content.get(name)
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [name]:
        raise ValueError(f"{name}: expected an array record holding exactly one array, {name!r}")
    array = record[name]
    return raw_vector(name, array.stype, array.dtype, tuple(array.shape), array.data, dtype)


def _model(content: RecordDict) -> np.ndarray | DownlinkModel:
    """The global model of a training message: a read-only view of its
    checked float32 bytes (the relay's socket hands the worker a copy), or
    under ``compression.down`` (record ``downlink``) a :class:`DownlinkModel`:
    the float32 model or the ``uint8`` arrays of a delta (record ``delta``),
    each checked here; the worker decodes the delta
    (:func:`fedtrain.compression.from_wire` checks every field)."""
    if "downlink" not in content:
        return _array(content, "params", WireDtype.FLOAT32)
    row = content["downlink"]
    if not isinstance(row, ConfigRecord):
        raise ValueError("downlink: expected a config record")
    digest, base = (row.get(k) for k in DOWNLINK_KEYS)
    if not isinstance(digest, str) or not isinstance(base, str):
        raise ValueError(f"downlink: {list(DOWNLINK_KEYS)} must be strings")
    if "delta" not in content:
        return DownlinkModel(digest, full=_array(content, "params", WireDtype.FLOAT32))
    record = content["delta"]
    if not isinstance(record, ArrayRecord) or sorted(record.keys()) != sorted(COMPRESSED_BYTES):
        raise ValueError(f"delta: expected an array record of exactly {sorted(COMPRESSED_BYTES)}")
    fields: dict[str, bytes | int] = {}
    for key in COMPRESSED_BYTES:
        array = record[key]
        raw_vector(f"delta {key}", array.stype, array.dtype, tuple(array.shape), array.data, WireDtype.UINT8)
        fields[key] = array.data
    for key in COMPRESSED_INTS:
        value = row.get(key)
        if type(value) is not int:
            raise ValueError(f"downlink {key} = {value!r}: expected an integer")
        fields[key] = value
    return DownlinkModel(digest, delta=fields, base=base)


def _payload(content: RecordDict) -> bytes:
    """The checked bytes of a secure message's ``payload`` record."""
    _array(content, "payload", WireDtype.UINT8)
    return content["payload"]["payload"].data


def _raw_array(data: bytes, dtype: WireDtype) -> Array:
    return Array(dtype=dtype.value, shape=(len(data) // dtype.numpy.itemsize,), stype=RAW_STYPE, data=data)


def _raw_record(name: str, data: bytes, dtype: WireDtype) -> ArrayRecord:
    return ArrayRecord({name: _raw_array(data, dtype)})


def _train_records(answer: TrainReply) -> RecordDict:
    result: dict[str, int | str] = {
        "status": "ok", "num_examples": answer.num_examples, "metrics": json.dumps(answer.metrics),
    }
    if answer.compressed is None:
        update = _raw_record("update", raw_bytes(answer.update.reshape(-1), WireDtype.FLOAT32), WireDtype.FLOAT32)
        return RecordDict({"update": update, "result": ConfigRecord(result)})
    fields = answer.compressed
    arrays = {k: _raw_array(bytes(fields[k]), WireDtype.UINT8) for k in COMPRESSED_BYTES}
    result.update({k: int(v) for k, v in fields.items() if k not in COMPRESSED_BYTES})
    return RecordDict({"compressed": ArrayRecord(arrays), "result": ConfigRecord(result)})


client_app = ClientApp()
"""The ``ClientApp`` of fedtrain's Flower app (its ``clientapp`` component)."""


def _relay(context: Context, request: tuple[RequestKind, object]) -> tuple[str, object]:
    worker = str(context.node_config[NODE_WORKER])
    key = Path(str(context.node_config[NODE_KEY_FILE])).read_text().strip()
    return relay(worker, key, request)


@client_app.query()
def _hello(message: Message, context: Context) -> Message:
    status, answer = _relay(context, (RequestKind.HELLO, str(message.content["hello"]["hello"])))
    if status != "ok" or not isinstance(answer, ClientInfo):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({"result": ConfigRecord({
        "status": "ok", "name": answer.name, "num_records": answer.num_records, "device": answer.device,
        "fingerprint": answer.fingerprint,
    })}), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    try:
        task = message.content["task"]
        body = (int(task["round"]), str(task["task"]), _model(message.content))
    except (KeyError, TypeError, ValueError) as exc:
        return Message(_status_error(f"malformed training message: {exc}"), reply_to=message)
    status, answer = _relay(context, (RequestKind.TRAIN, body))
    if status != "ok" or not isinstance(answer, TrainReply):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(_train_records(answer), reply_to=message)


@client_app.train("secure")
def _train_secure(message: Message, context: Context) -> Message:
    """Train and keep the update; the reply is the client's encoded key advert."""
    try:
        task = message.content["task"]
        body = (int(task["round"]), str(task["task"]), _model(message.content), _payload(message.content))
    except (KeyError, TypeError, ValueError) as exc:
        return Message(_status_error(f"malformed secure training message: {exc}"), reply_to=message)
    status, answer = _relay(context, (RequestKind.TRAIN_SECURE, body))
    return _secure_reply(message, status, answer)


@client_app.query("secure")
def _secure_stage(message: Message, context: Context) -> Message:
    """One later secure-aggregation stage: the payload goes to the worker as
    bytes, which decodes it with :mod:`fedtrain.secure.wire`; the reply is
    the worker's encoded message."""
    try:
        body = message.content["secure"]
        request = SecureRequest(int(body["round"]), SecureStage(str(body["stage"])), _payload(message.content))
    except (KeyError, TypeError, ValueError) as exc:
        return Message(_status_error(f"malformed secure-aggregation message: {exc}"), reply_to=message)
    status, answer = _relay(context, (RequestKind.SECURE, request))
    return _secure_reply(message, status, answer)


def _secure_reply(message: Message, status: str, answer: object) -> Message:
    if status != "ok" or not isinstance(answer, bytes):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({
        "result": ConfigRecord({"status": "ok"}),
        "payload": _raw_record("payload", answer, WireDtype.UINT8),
    }), reply_to=message)
