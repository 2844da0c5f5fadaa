"""Tensors on the deployment wire (issue 17): the global model, the update and
every secure-aggregation payload travel as raw little-endian bytes in
Flower's records, checked where they enter, survive Flower 1.42's own
object deflation and chunking, and are counted by :func:`record_bytes`."""

from __future__ import annotations

import json
import uuid
from typing import Iterator

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedtrain.config import ClientConfig, load, to_dict
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.secure import wire
from fedtrain.secure.messages import MaskedInput
from fedtrain.training.train_task import TrainTask
from fedtrain.transport import flower, flower_client_app
from fedtrain.transport.relay import NODE_KEY_FILE, NODE_WORKER, RAW_STYPE, Hello, WireDtype, raw_vector
from fedtrain.types import RoundPlan

NUMEL = 7


@pytest.fixture()
def run_identity() -> Iterator[None]:
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def test_a_vector_travels_as_exactly_its_little_endian_bytes() -> None:
    vector = np.linspace(-1, 1, NUMEL, dtype=np.float32)
    array = flower.float32_array(vector.astype(">f4"))

    assert (array.stype, array.dtype, tuple(array.shape)) == (RAW_STYPE, "float32", (NUMEL,))
    assert array.data == vector.astype("<f4").tobytes() and len(array.data) == 4 * NUMEL
    back = raw_vector("v", array.stype, array.dtype, tuple(array.shape), array.data, WireDtype.FLOAT32, NUMEL)
    assert back.tolist() == vector.tolist() and not back.flags.writeable, "a view of the bytes, not a copy"


def test_the_declared_length_is_never_trusted() -> None:
    with pytest.raises(ValueError, match=r"0 bytes do not hold .* expected exactly 4 × 1000000000"):
        raw_vector("update", RAW_STYPE, "float32", (10**9,), b"", WireDtype.FLOAT32)
    with pytest.raises(ValueError, match="shape"):
        raw_vector("update", RAW_STYPE, "float32", (True,), b"\0" * 4, WireDtype.FLOAT32)
    with pytest.raises(ValueError, match="data is a str"):
        raw_vector("update", RAW_STYPE, "float32", (1,), "abcd", WireDtype.FLOAT32)


def _deflate_inflate(content: RecordDict) -> RecordDict:
    """``content`` through Flower 1.42's own wire form: content-addressed objects."""
    objects = get_all_nested_objects(content)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    return inflate_object_from_contents(content.object_id, contents)  # type: ignore[return-value]


def test_a_large_update_is_chunked_by_flower_and_arrives_whole() -> None:
    numel = 3 * 2**20 + 5  # 12 MiB + 20 bytes: three 5 MiB chunks
    vector = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    content = RecordDict({
        "update": ArrayRecord({"update": flower.float32_array(vector.numpy())}),
        "result": ConfigRecord({"status": "ok", "num_examples": 3, "metrics": json.dumps({"train_loss": 0.5})}),
    })
    array = content["update"]["update"]
    assert len(array.slice_array()) == 3

    back, count, _ = flower.parse_train_reply(_deflate_inflate(content), numel)

    assert count == 3 and torch.equal(torch.from_numpy(back.copy()), vector)


def test_the_coordinators_model_is_what_the_client_app_reads() -> None:
    params = torch.arange(NUMEL, dtype=torch.float32) / 3
    content = RecordDict({"params": flower.FlowerTransport.model_record(params)})

    model = flower_client_app._model(_deflate_inflate(content))

    assert model.dtype == np.float32 and model.tolist() == params.tolist()


def test_the_client_app_refuses_a_model_that_is_not_raw_bytes(run_identity: None) -> None:
    """The relay never reaches the worker: the node config names no worker at all."""
    context = Context(1, 5, {NODE_WORKER: "/nonexistent", NODE_KEY_FILE: "/nonexistent"}, RecordDict(), {})
    for params in (Array(np.zeros(NUMEL, np.float32)),
                   Array(dtype="float64", shape=(NUMEL,), stype=RAW_STYPE, data=bytes(8 * NUMEL)),
                   Array(dtype="float32", shape=(NUMEL,), stype=RAW_STYPE, data=bytes(4 * NUMEL - 1))):
        message = Message(RecordDict({"params": ArrayRecord({"params": params}),
                                      "task": ConfigRecord({"round": 1, "task": "{}"})}),
                          dst_node_id=5, message_type="train")
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        reply = flower_client_app._train(message, context)
        result = reply.content["result"]
        assert result["status"] == "error" and "malformed training message: params" in str(result["reason"])


def test_a_secure_payload_is_raw_bytes_in_an_array() -> None:
    data = wire.encode(MaskedInput(1, np.arange(2**20, dtype=np.uint32)))
    content = RecordDict({"payload": ArrayRecord({"payload": flower.bytes_array(data)})})

    assert flower.payload_bytes(_deflate_inflate(content)) == data
    assert flower.record_bytes(content) == len(data) == 4 * 2**20 + 16
    bad = RecordDict({"payload": ArrayRecord({"payload": Array(np.frombuffer(data, np.uint8))})})
    with pytest.raises(flower.RejectedReply, match="stype"):
        flower.payload_bytes(bad)
    wrong = RecordDict({"payload": ArrayRecord({"payload": flower.float32_array(np.zeros(4, np.float32))})})
    with pytest.raises(flower.RejectedReply, match="dtype = 'float32': expected 'uint8'"):
        flower.payload_bytes(wrong)


def test_record_bytes_counts_arrays_bytes_text_and_numbers() -> None:
    content = RecordDict({
        "params": ArrayRecord({"params": flower.float32_array(np.zeros(NUMEL, np.float32))}),
        "task": ConfigRecord({"round": 3, "task": "é" * 5, "blob": b"xyz", "list": [1, 2]}),
    })
    assert flower.record_bytes(content) == 4 * NUMEL + 8 + 10 + 3 + 16


class EchoGrid:
    """Stands in for Flower's ``Grid``: nodes 1 … 3 answer every training
    message with an update of ``NUMEL`` zeros (a crafted client)."""

    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex
            self.pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        out = []
        for message_id in list(message_ids):
            message = self.pending.pop(message_id)
            node = message.metadata.dst_node_id
            if message.metadata.message_type == "query":
                content = RecordDict({"result": ConfigRecord({
                    "status": "ok", "name": str(node), "num_records": 10, "device": "cpu", "fingerprint": "0" * 64})})
            else:
                content = RecordDict({
                    "update": ArrayRecord({"update": flower.float32_array(np.zeros(NUMEL, np.float32))}),
                    "result": ConfigRecord({"status": "ok", "num_examples": 10, "metrics": '{"train_loss": 0.5}'}),
                })
            out.append(Message(content, reply_to=message))
        return out


def test_the_transport_counts_each_rounds_payload_bytes(run_identity: None, caplog: pytest.LogCaptureFixture) -> None:
    config = load(None, ["data.num_clients=3", "strategy.clients_per_round=3"])
    transport = flower.FlowerTransport(EchoGrid(), Hello(to_dict(config), (NUMEL,), 2), timeout=5.0,  # type: ignore[arg-type]
                                       poll_seconds=0.0)
    names = transport.wait_for_clients(3, 3, 0.0)
    task = TrainTask.of(ClientConfig(), RoundPlan(tuple(names)), ClientPrivacy())
    caplog.set_level("INFO", logger="fedtrain.transport.flower")

    outcome = transport.train_round(4, names, task, torch.zeros(NUMEL))

    assert len(outcome.updates) == 3
    traffic = transport.traffic
    task_bytes = sum(len(json.dumps(transport.own_task(task, c).as_json()).encode()) for c in names)
    assert traffic.sent_messages == 3 and traffic.sent_bytes == 3 * (4 * NUMEL + 8) + task_bytes
    assert traffic.received_messages == 3
    assert traffic.received_bytes == 3 * (4 * NUMEL + len("ok") + 8 + len('{"train_loss": 0.5}'))
    assert traffic.describe(4) in caplog.text
