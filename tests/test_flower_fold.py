"""The Flower transport folds each training reply as it is decoded: the
same updates and failures as when it returns them, none held."""

from __future__ import annotations

import json
import uuid
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtrain.aggregation import Reduction, UpdateFold, weighted_mean
from fedtrain.config import ClientConfig, load, to_dict
from fedtrain.engine import RoundIntake
from fedtrain.privacy.policy import ClientPrivacy, NoPrivacy
from fedtrain.training.executor import takes_sink
from fedtrain.training.train_task import TrainTask
from fedtrain.transport import flower
from fedtrain.transport.relay import Hello
from fedtrain.types import RoundPlan, UpdateKind

NUMEL = 5


@pytest.fixture()
def run_identity() -> Iterator[None]:
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


Reply = Callable[[Message], RecordDict]


class CannedGrid:
    """Flower's ``Grid`` for the test: each node answers with its function's
    content, in reverse order of the messages; node 9 never answers training."""

    def __init__(self, replies: Mapping[int, Reply]) -> None:
        self.replies = dict(replies)
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def push_messages(self, messages: Sequence[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        out = []
        for message_id in sorted(message_ids, reverse=True):
            message = self.pending.pop(message_id, None)
            silent = message is not None and message.metadata.dst_node_id == 9 and (
                message.metadata.message_type != "query")
            if message is not None and not silent:
                out.append(Message(self.replies[message.metadata.dst_node_id](message), reply_to=message))
        return out


def _client(name: str, examples: int, vector: np.ndarray | None = None, metrics: str = '{"train_loss": 0.5}') -> Reply:
    def reply(message: Message) -> RecordDict:
        if message.metadata.message_type == "query":
            row = {"status": "ok", "name": name, "num_records": examples, "device": "cpu", "fingerprint": "0" * 64}
            return RecordDict({"result": ConfigRecord(row)})
        update = vector if vector is not None else np.arange(NUMEL, dtype=np.float32) * examples
        return RecordDict({
            "update": ArrayRecord({"update": flower.float32_array(update)}),
            "result": ConfigRecord({"status": "ok", "num_examples": examples, "metrics": metrics}),
        })

    return reply


def _backend() -> flower.FlowerTransport:
    config = load(None, ["data.num_clients=5", "strategy.clients_per_round=5"])
    replies = {
        1: _client("a", 120),
        2: _client("nan", 60, np.array([0, np.nan, 0, 0, 0], np.float32)),
        3: _client("b", 30),
        4: _client("bad_metric", 10, metrics='{"train_loss": NaN}'),
        9: _client("silent", 10),
    }
    return flower.FlowerTransport(CannedGrid(replies), Hello(to_dict(config), (NUMEL,), 2), timeout=0.05,  # type: ignore[arg-type]
                                  poll_seconds=0.0)


def test_replies_are_folded_as_decoded_with_the_failures_of_the_returned_round(run_identity: None) -> None:
    returned, streamed = _backend(), _backend()
    assert takes_sink(streamed)
    names = returned.wait_for_clients(expected=5, minimum=1, wait=0.0)
    assert streamed.wait_for_clients(expected=5, minimum=1, wait=0.0) == names
    task = TrainTask.of(ClientConfig(), RoundPlan(tuple(names)), ClientPrivacy())

    plain = returned.train_round(1, names, task, torch.zeros(NUMEL))
    fold = UpdateFold(Reduction.WEIGHTED_MEAN, NUMEL, names, UpdateKind.DELTA, torch.device("cpu"))
    intake = RoundIntake(fold, NoPrivacy(), UpdateKind.DELTA)
    folded = streamed.train_round(1, names, task, torch.zeros(NUMEL), sink=intake)

    assert folded.updates == ()
    assert [f.client_id for f in folded.failures] == [f.client_id for f in plain.failures]
    assert {f.client_id: f.reason for f in folded.failures} == {f.client_id: f.reason for f in plain.failures}
    assert "no reply within" in {f.client_id: f.reason for f in folded.failures}["silent"]
    assert [f.reason for f in intake.invalid] == ["vector has NaN or infinite values"]
    assert [c.client_id for c in fold.clients] == ["a", "b"]
    good = [u for u in plain.updates if u.client_id in ("a", "b")]
    assert torch.equal(fold.result(), weighted_mean(good))
    assert fold.aggregate().num_examples == 150
    assert json.loads(json.dumps(dict(fold.clients[0].metrics))) == {"train_loss": 0.5}
