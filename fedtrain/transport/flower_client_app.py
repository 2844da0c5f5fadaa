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
- ``train`` → reply: the flat float32 update, the record count and the metrics;
- ``train.secure`` → reply: the client's encoded key advert (the worker
  trains and keeps its update);
- ``query.secure`` → reply: the client's encoded message for the stage.

A worker's error, or a malformed secure message, is answered with
``status = "error"`` and the reason; the payloads of secure messages are
passed on as bytes and decoded by the worker (:mod:`fedtrain.secure.wire`),
never here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtrain.transport.relay import (
    NODE_KEY_FILE,
    NODE_WORKER,
    ClientInfo,
    RequestKind,
    SecureRequest,
    SecureStage,
    TrainReply,
    relay,
)


def _status_error(reason: str) -> RecordDict:
    return RecordDict({"result": ConfigRecord({"status": "error", "reason": reason})})


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
    task = message.content["task"]
    params = message.content["params"]["params"].numpy()
    status, answer = _relay(context, (RequestKind.TRAIN, (int(task["round"]), str(task["task"]), params)))
    if status != "ok" or not isinstance(answer, TrainReply):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({
        "update": ArrayRecord({"update": Array(np.ascontiguousarray(answer.update, dtype=np.float32))}),
        "result": ConfigRecord({
            "status": "ok", "num_examples": answer.num_examples, "metrics": json.dumps(answer.metrics),
        }),
    }), reply_to=message)


@client_app.train("secure")
def _train_secure(message: Message, context: Context) -> Message:
    """Train and keep the update; the reply is the client's encoded key advert."""
    try:
        task = message.content["task"]
        params = message.content["params"]["params"].numpy()
        payload = message.content["secure"]["payload"]
        if not isinstance(payload, bytes):
            raise TypeError(f"payload is a {type(payload).__name__}, expected bytes")
        body = (int(task["round"]), str(task["task"]), params, payload)
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
        payload = body["payload"]
        if not isinstance(payload, bytes):
            raise TypeError(f"payload is a {type(payload).__name__}, expected bytes")
        request = SecureRequest(int(body["round"]), SecureStage(str(body["stage"])), payload)
    except (KeyError, TypeError, ValueError) as exc:
        return Message(_status_error(f"malformed secure-aggregation message: {exc}"), reply_to=message)
    status, answer = _relay(context, (RequestKind.SECURE, request))
    return _secure_reply(message, status, answer)


def _secure_reply(message: Message, status: str, answer: object) -> Message:
    if status != "ok" or not isinstance(answer, bytes):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({"result": ConfigRecord({"status": "ok", "payload": answer})}), reply_to=message)
