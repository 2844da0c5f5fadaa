"""The deployed secure-aggregation path in one process: SecureFlowerTransport
drives real ClientWorkers through fedtrain's ClientApp handlers and their
authenticated local sockets, with a loopback stand-in for Flower's Grid.
Fast where tests/test_deploy_secure.py (real processes) is slow: the sum is
checked against the clients' own updates, and a client that sends garbage is
left out without crashing the coordinator."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtrain.transport import flower, flower_client_app
from fedtrain.training.train_task import TrainTask
from fedtrain.deploy.worker import ClientWorker, WorkerServer
from fedtrain.config import ConfigError, load, to_dict
from fedtrain.deploy.server import check_secure_deployment
from fedtrain.transport.relay import NODE_KEY_FILE, NODE_WORKER, Hello, TrainReply
from fedtrain.secure.setting import SecureSettings
from fedtrain.layout import ParamLayout
from fedtrain.run import client_data, prepare_model
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.types import AggregateOrigin, AggregateUpdate, RoundPlan, UpdateKind

Handler = Callable[[Message], "Message | None"]


class LoopbackGrid:
    """Stands in for Flower's ``Grid``: each pushed message is handed to its
    node's handler when pulled; a handler returning None never replies."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        replies = []
        for message_id in list(message_ids):
            message = self.pending.pop(message_id, None)
            if message is None:
                continue
            reply = self.handlers[message.metadata.dst_node_id](message)
            if reply is not None:
                replies.append(reply)
        return replies


class RecordingWorker(ClientWorker):
    """A ClientWorker that remembers each clear update (for the test's expected sum)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, name, None, "cpu")
        self.updates: dict[int, TrainReply] = {}

    def train(self, rnd: int, task_json: str, params: np.ndarray) -> TrainReply:
        reply = super().train(rnd, task_json, params)
        self.updates[rnd] = reply
        return reply


@pytest.fixture(autouse=True)
def run_identity() -> Iterator[None]:
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def _client_app(worker: ClientWorker, folder: Path, node: int) -> tuple[Handler, WorkerServer]:
    folder.mkdir()
    server = WorkerServer(worker, folder)
    key = folder / "worker.key"
    key.write_text(server.authkey.hex())
    server.start()
    context = Context(1, node, {NODE_WORKER: server.address, NODE_KEY_FILE: str(key)}, RecordDict(), {})
    routes = {"query": flower_client_app._hello, flower.TRAIN_SECURE: flower_client_app._train_secure,
              flower.QUERY_SECURE: flower_client_app._secure_stage}

    def handle(message: Message) -> Message:
        return routes[message.metadata.message_type](message, context)

    return handle, server


def _run(
    tmp_path: Path,
    tamper: Callable[[int, Message, Message], Message | None] | None,
    privacy: ClientPrivacy = ClientPrivacy(),
) -> tuple[
    object, list[RecordingWorker], torch.Tensor, SecureSettings
]:
    n = 4
    config = load(None, [f"data.num_clients={n}", f"strategy.clients_per_round={n}", "secure.aggregation=true"])
    data = client_data(config, torch.device("cpu"))
    model, _ = prepare_model(config, data.input_shape, data.num_classes, data.x_test[:2])
    params = ParamLayout.of(model.state_dict()).flatten(model.state_dict())
    workers = [RecordingWorker(str(i)) for i in range(n)]
    handlers: dict[int, Handler] = {}
    servers = []
    for i, worker in enumerate(workers):
        inner, server = _client_app(worker, tmp_path / f"client-{i}", 100 + i)
        servers.append(server)

        def handle(message: Message, inner: Handler = inner, i: int = i) -> Message | None:
            reply = inner(message)
            return reply if tamper is None or reply is None else tamper(i, message, reply)

        handlers[100 + i] = handle
    settings = SecureSettings.of(config)
    backend = flower.SecureFlowerTransport(
        LoopbackGrid(handlers), Hello(to_dict(config), data.input_shape, data.num_classes),  # type: ignore[arg-type]
        timeout=5.0, poll_seconds=0.01, settings=settings, weighted=True,
    )
    try:
        names = backend.wait_for_clients(n, 2, 10.0)
        task = TrainTask.of(config.client, RoundPlan(tuple(names), kind=UpdateKind.DELTA), privacy)
        outcome = backend.train_round(1, names, task, params)
    finally:
        for server in servers:
            server.close()
    return outcome, workers, params, settings


def test_deployed_secure_round_sums_the_clients_updates(tmp_path: Path) -> None:
    outcome, workers, params, settings = _run(tmp_path, None)
    assert outcome.failures == ()
    (aggregate,) = outcome.updates
    assert isinstance(aggregate, AggregateUpdate) and aggregate.origin is AggregateOrigin.SECURE_SUM
    assert aggregate.client_id == "secure-aggregate" and aggregate.contributors == 4
    weights = [min(w.updates[1].num_examples, settings.max_weight) for w in workers]
    expected = sum(w.updates[1].update.astype(np.float64) * k for w, k in zip(workers, weights)) / sum(weights)
    assert aggregate.num_examples == sum(weights)
    assert aggregate.vector.shape == params.shape and aggregate.vector.dtype == torch.float32
    np.testing.assert_allclose(aggregate.vector.numpy(), expected, atol=1e-5)
    assert all(not w._held for w in workers), "clients keep no state after the round"


def test_distributed_dp_noise_is_added_by_the_clients(tmp_path: Path) -> None:
    clip, noise = 0.5, 2.0
    outcome, workers, _, _ = _run(tmp_path, None, ClientPrivacy(clip=clip, distributed_noise=noise))
    (aggregate,) = outcome.updates
    assert aggregate.contributors == 4 and aggregate.num_examples == 4, "unit weights under distributed DP"
    assert isinstance(aggregate, AggregateUpdate) and aggregate.unit_weights
    clear = [w.updates[1].update.astype(np.float64) for w in workers]
    assert all(np.linalg.norm(u) <= clip * (1 + 1e-5) for u in clear), "clients clip before adding noise"
    residual = aggregate.vector.numpy() - sum(clear) / 4
    # each of 4 clients adds N(0, noise² / 4): the mean carries std noise / 4
    assert residual.size > 1000
    assert abs(residual.std() / (noise / 4) - 1) < 0.1, residual.std()


def test_garbage_from_one_client_leaves_it_out_and_the_round_goes_on(tmp_path: Path) -> None:
    def tamper(i: int, message: Message, reply: Message) -> Message:
        if i == 3 and message.metadata.message_type == flower.QUERY_SECURE \
                and message.content["secure"]["stage"] == "masked_input":
            return Message(RecordDict({"result": ConfigRecord({"status": "ok", "payload": b"\x80\x04garbage"})}),
                           reply_to=message)
        return reply

    outcome, workers, _, settings = _run(tmp_path, tamper)
    failures = {f.client_id: f.reason for f in outcome.failures}
    assert list(failures) == ["3"] and "malformed" in failures["3"], failures
    (aggregate,) = outcome.updates
    assert aggregate.contributors == 3
    weights = [min(w.updates[1].num_examples, settings.max_weight) for w in workers[:3]]
    rows = [w.updates[1].update.astype(np.float64) * k for w, k in zip(workers, weights)]
    np.testing.assert_allclose(aggregate.vector.numpy(), sum(rows) / sum(weights), atol=1e-5)


def test_client_that_never_trains_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    def tamper(i: int, message: Message, reply: Message) -> Message | None:
        return None if i == 0 and message.metadata.message_type == flower.TRAIN_SECURE else reply

    outcome, _, _, _ = _run(tmp_path, tamper)
    failures = {f.client_id: f.reason for f in outcome.failures}
    assert list(failures) == ["0"] and "no reply" in failures["0"], failures
    assert outcome.updates[0].contributors == 3
    assert json.dumps(failures)


def test_server_refuses_secure_settings_a_deployment_cannot_honour() -> None:
    with pytest.raises(ConfigError, match="simulated_dropout"):
        check_secure_deployment(load(None, ["secure.aggregation=true", "secure.simulated_dropout=0.1"]))
    with pytest.raises(ConfigError, match="needs_individual_updates"):
        check_secure_deployment(load(None, ["secure.aggregation=true", "strategy.name=fedmedian"]))
    check_secure_deployment(load(None, ["secure.aggregation=true"]))
    check_secure_deployment(load(None, ["strategy.name=fedmedian"]))
