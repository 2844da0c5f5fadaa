"""Deployment over Flower: the only module that imports ``flwr``.

- :data:`server_app` is the Flower ``ServerApp`` that ``fedtrain server``
  submits to its SuperLink. It runs the same :class:`~fedtrain.engine.Engine`
  as a simulation, with :class:`FlowerBackend` carrying each round's task to
  the SuperNodes and their updates back, and writes the same run folder.
- :data:`client_app` is the Flower ``ClientApp`` that SuperNodes run for each
  message: a relay to the warm :class:`~fedtrain.client_worker.ClientWorker`
  that ``fedtrain client`` started next to its SuperNode.

Messages (Flower's Message API, ``flwr.app``):

- ``query`` (hello) → the run's config and model shape; reply: the client's
  id, record count and device.
- ``train`` → the flat float32 global model and the round's
  :class:`~fedtrain.client.TrainTask` as JSON; reply: the flat update, the
  record count and the metrics, or ``status = "error"`` with a reason.

Under secure aggregation (:class:`SecureFlowerBackend`) ``train`` becomes:

- ``train.secure`` → the model, the task and the round's encoded
  ``AdvertiseRequest``; the client trains, keeps its update, and replies
  with its encoded ``KeyAdvert``;
- ``query.secure`` (``stage`` = share keys, masked input, unmask) → the
  coordinator's stage message; reply: the client's. Payloads are bytes in
  :mod:`fedtrain.secure.wire`'s JSON encoding, decoded without trust on both
  sides; the clear update never leaves the client.

Flower's own ``Grid.send_and_receive`` polls every 3 s; the backend pushes
with ``push_messages`` and polls ``pull_messages`` every ``--poll`` seconds
instead (:data:`fedtrain.deploy.DEFAULT_POLL`). torch and the engine are imported inside the
coordinator's code only: the ClientApp relay runs in a fresh process per
message and must stay light.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtrain.relay import (
    NODE_KEY_FILE,
    NODE_WORKER,
    ClientInfo,
    Hello,
    RequestKind,
    SecureRequest,
    SecureStage,
    TrainReply,
    relay,
)

if TYPE_CHECKING:
    import torch

    from fedtrain.client import TrainTask
    from fedtrain.deploy import SecureDeployment
    from fedtrain.engine import ClientFailure, RoundOutcome
    from fedtrain.secure.setting import SecureSettings
    from fedtrain.types import ClientUpdate, UpdateKind

log = logging.getLogger(__name__)

M = TypeVar("M")

HELLO_SECONDS = 120.0
"""How long a client may take to load its data and build the model."""


def _status_error(reason: str) -> RecordDict:
    return RecordDict({"result": ConfigRecord({"status": "error", "reason": reason})})


class FlowerBackend:
    """Carries rounds to SuperNodes through a Flower ``Grid``.

    Clients are known by the id they answer the hello with (their partition,
    or the name of their own data set), so the engine, the sampler and the
    privacy ledger see the same ids as in a simulation; the map to Flower
    node ids is refreshed every round, so a client that restarts (same key,
    same node id) or reconnects is found again.
    """

    def __init__(self, grid: Grid, hello: Hello, timeout: float, poll_seconds: float) -> None:
        self.grid = grid
        self.hello = hello
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.clients: dict[str, ClientInfo] = {}
        self._node_of: dict[str, int] = {}
        self._greeted: set[int] = set()

    def _exchange(self, messages: Sequence[Message], timeout: float) -> dict[int, Message]:
        """Push ``messages``; the replies that arrive within ``timeout``, by node id."""
        if not messages:
            return {}
        node_of_message = {}
        for message_id, message in zip(self.grid.push_messages(messages), messages):
            node_of_message[message_id] = message.metadata.dst_node_id
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        pending = set(node_of_message)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies[node_of_message[reply.metadata.reply_to_message_id]] = reply
            if pending:
                time.sleep(self.poll_seconds)
        return replies

    def discover(self) -> None:
        """Greet every connected node not greeted since it last connected or
        failed, and learn who it is (a restarted client needs the hello again)."""
        live = set(self.grid.get_node_ids())
        self._greeted &= live
        new = [n for n in live if n not in self._greeted]
        if not new:
            return
        content = RecordDict({"hello": ConfigRecord({"hello": self.hello.as_json()})})
        messages = [
            Message(content, dst_node_id=n, message_type=MessageType.QUERY, ttl=HELLO_SECONDS) for n in new
        ]
        for node, reply in self._exchange(messages, HELLO_SECONDS).items():
            self._greeted.add(node)
            if reply.has_error():
                log.warning("node %d refused the run: %s", node, reply.error.reason)
                continue
            result = reply.content["result"]
            if result.get("status") != "ok":
                log.warning("node %d refused the run: %s", node, result.get("reason"))
                continue
            info = ClientInfo(str(result["name"]), int(result["num_records"]), str(result["device"]))
            holder = self._node_of.get(info.name)
            if holder is not None and holder != node and holder in self.grid.get_node_ids():
                log.warning("node %d claims client id %s, already held by node %d; ignored", node, info.name, holder)
                continue
            self._node_of[info.name] = node
            self.clients[info.name] = info
            log.warning("client %s joined (node %d, %d records, %s)", info.name, node, info.num_records, info.device)

    def wait_for_clients(self, expected: int, minimum: int, wait: float) -> list[str]:
        """Greet nodes until ``expected`` clients joined or ``wait`` seconds
        passed; the ids of those that joined, at least ``minimum`` of them."""
        deadline = time.monotonic() + wait
        while True:
            self.discover()
            if len(self.clients) >= expected or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if len(self.clients) < minimum:
            raise RuntimeError(
                f"only {len(self.clients)} client(s) joined within {wait:g} s; strategy.min_clients = {minimum}"
            )
        return sorted(self.clients, key=lambda c: (len(c), c))

    def _decode(
        self, cid: str, reply: Message, kind: UpdateKind, device: torch.device
    ) -> ClientUpdate | ClientFailure:
        import torch

        from fedtrain.engine import ClientFailure
        from fedtrain.types import ClientUpdate

        if reply.has_error():
            return ClientFailure(cid, f"client error: {reply.error.reason}")
        try:
            result = reply.content["result"]
            if result.get("status") != "ok":
                return ClientFailure(cid, f"client error: {result.get('reason')}")
            vector = torch.from_numpy(np.ascontiguousarray(reply.content["update"]["update"].numpy())).to(device)
            num_examples = int(result["num_examples"])
            metrics = {str(k): float(v) for k, v in json.loads(str(result["metrics"])).items()}
        except Exception as exc:  # a malformed reply is this client's failure, not the round's
            return ClientFailure(cid, f"malformed reply: {type(exc).__name__}: {exc}")
        registered = self.clients[cid].num_records
        if num_examples != registered:
            return ClientFailure(
                cid, f"declared {num_examples} examples, but joined with {registered} records"
            )
        return ClientUpdate(cid, vector, num_examples, kind, metrics)

    def _connected(self, clients: Sequence[str]) -> tuple[dict[str, int], list[ClientFailure]]:
        """The node of each of ``clients`` that is connected, and a failure for each that is not."""
        from fedtrain.engine import ClientFailure

        self.discover()
        live = set(self.grid.get_node_ids())
        nodes: dict[str, int] = {}
        failures: list[ClientFailure] = []
        for cid in clients:
            node = self._node_of.get(cid)
            if node is None or node not in live:
                failures.append(ClientFailure(cid, "not connected"))
            else:
                nodes[cid] = node
        return nodes, failures

    def _train_content(self, rnd: int, task: TrainTask, params: torch.Tensor) -> RecordDict:
        return RecordDict({
            "params": ArrayRecord({"params": Array(params.detach().cpu().numpy())}),
            "task": ConfigRecord({"round": rnd, "task": json.dumps(task.as_json())}),
        })

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        from fedtrain.engine import ClientFailure, RoundOutcome
        from fedtrain.types import ClientUpdate

        nodes, failures = self._connected(clients)
        content = self._train_content(rnd, task, params)
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.timeout, group_id=str(rnd))
            for node in nodes.values()
        ]
        replies = self._exchange(messages, self.timeout)
        updates: list[ClientUpdate] = []
        for cid, node in nodes.items():
            reply = replies.get(node)
            outcome = (
                ClientFailure(cid, f"no reply within {self.timeout:g} s")
                if reply is None else self._decode(cid, reply, task.kind, params.device)
            )
            if isinstance(outcome, ClientUpdate):
                updates.append(outcome)
            else:
                failures.append(outcome)
                self._greeted.discard(node)
        return RoundOutcome(tuple(updates), tuple(failures))


TRAIN_SECURE = f"{MessageType.TRAIN}.secure"
"""Message type of a secure round's first message: the training task and the
round's :class:`~fedtrain.secure.messages.AdvertiseRequest`; the client
trains, keeps its update and answers with its key advert."""

QUERY_SECURE = f"{MessageType.QUERY}.secure"
"""Message type of the later secure-aggregation stages (:class:`SecureStage`)."""

STAGE_SECONDS = 120.0
"""Longest wait for one protocol stage's replies after training (or
``client.timeout`` when shorter); a client that misses it is a dropout."""


def _secure_record(rnd: int, stage: SecureStage | None, payload: bytes) -> ConfigRecord:
    row: dict[str, int | str | bytes] = {"round": rnd, "payload": payload}
    if stage is not None:
        row["stage"] = stage.value
    return ConfigRecord(row)


def _reply_error(reply: Message) -> str | None:
    """Why ``reply`` carries no result, or None."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    try:
        result = reply.content["result"]
        status = result.get("status")
    except Exception as exc:  # a malformed reply is this client's failure
        return f"malformed reply: {type(exc).__name__}: {exc}"
    if status != "ok":
        return f"client error: {result.get('reason')}"
    return None


class SecureFlowerBackend(FlowerBackend):
    """:class:`FlowerBackend` with SecAgg+: the coordinator drives
    :class:`~fedtrain.secure.protocol.SecureServer` over Flower messages and
    the engine gets the same single aggregate as from
    :class:`fedtrain.backends.secure.SecureAggregationBackend` in a
    simulation: ``client_id = "secure-aggregate"``, the survivors' weighted
    mean, ``num_examples`` their summed weight, ``contributors`` their count,
    and a failure for each client left out.

    A round is four exchanges: ``train.secure`` (the task and the round's
    public setup; the client trains, keeps its update, answers with its key
    advert), then ``query.secure`` for sharing keys, the masked input and
    unmasking. The round's clients are those connected when it starts; one
    whose training fails is a dropout before it shared anything. After
    training, each stage waits at most :data:`STAGE_SECONDS` (or the client
    timeout); a client that misses it, answers with an error or sends a
    message that does not decode (:mod:`fedtrain.secure.wire`) is a dropout.
    Distributed DP noise is drawn by each client
    (:class:`fedtrain.privacy.noise.SecureGaussian`, whatever
    ``privacy.secure_noise`` says: a deployment is not reproducible anyway).
    """

    def __init__(
        self, grid: Grid, hello: Hello, timeout: float, poll_seconds: float,
        settings: SecureSettings, weighted: bool,
    ) -> None:
        super().__init__(grid, hello, timeout, poll_seconds)
        self.settings = settings
        self.weighted = weighted

    def _gather(
        self, messages: dict[int, Message], seconds: float, stage: str, expected: type[M], why: dict[int, str],
    ) -> list[M]:
        """Send each client index its message; the decoded replies that came
        in time, each checked to come from the index it was sent to. A client
        that did not answer properly gets its reason in ``why``."""
        from fedtrain.secure import wire

        index_of_node = {m.metadata.dst_node_id: index for index, m in messages.items()}
        started = time.perf_counter()
        replies = self._exchange(list(messages.values()), seconds)
        log.info("secure aggregation, %s: %d of %d replies in %.2f s",
                 stage, len(replies), len(messages), time.perf_counter() - started)
        out: list[M] = []
        for node, index in index_of_node.items():
            reply = replies.get(node)
            error = f"no reply within {seconds:g} s" if reply is None else _reply_error(reply)
            if reply is not None and error is None:
                try:
                    payload = reply.content["result"]["payload"]
                    if not isinstance(payload, bytes):
                        raise ValueError(f"payload is a {type(payload).__name__}, expected bytes")
                    decoded = wire.decode(payload, expected)
                    sender = getattr(decoded, "sender")
                    if sender != index:
                        raise ValueError(f"sender {sender}, but the message went to client {index}")
                    out.append(decoded)
                except Exception as exc:  # anything malformed leaves this client out, never the round
                    error = f"malformed reply: {exc}"
            if error is not None:
                why.setdefault(index, f"{stage}: {error}")
        return out

    def _stage(
        self, rnd: int, stage: SecureStage, outgoing: Mapping[int, object], nodes: Mapping[int, int],
        expected: type[M], why: dict[int, str],
    ) -> list[M]:
        """One ``query.secure`` stage: each client's ``outgoing`` message out, the replies back."""
        from fedtrain.secure import wire

        seconds = min(self.timeout, STAGE_SECONDS)
        messages = {
            index: Message(
                RecordDict({"secure": _secure_record(rnd, stage, wire.encode(message))}),
                dst_node_id=nodes[index], message_type=QUERY_SECURE, ttl=seconds, group_id=str(rnd),
            )
            for index, message in outgoing.items()
        }
        return self._gather(messages, seconds, stage.value, expected, why)

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        from fedtrain.backends.secure import aggregate_update
        from fedtrain.engine import ClientFailure, RoundOutcome
        from fedtrain.secure import wire
        from fedtrain.secure.messages import AdvertiseRequest, KeyAdvert, MaskedInput, SharedKeys, UnmaskResponse
        from fedtrain.secure.protocol import SecureAggregationAborted, SecureServer

        connected, failures = self._connected(clients)
        if not connected:
            return RoundOutcome((), tuple(failures))
        ids = sorted(connected, key=lambda c: (len(c), c))
        nodes = {i: connected[cid] for i, cid in enumerate(ids)}
        noise = task.privacy.distributed_noise
        setup = self.settings.setup(
            num_clients=len(ids),
            vector_length=params.numel(),
            noise_stddev=noise / math.sqrt(len(clients)) if noise > 0 else 0.0,
            weighted=self.weighted and noise == 0,
        )
        server = SecureServer(setup, self.settings.graph(len(ids)))
        why: dict[int, str] = {}
        train = self._train_content(rnd, task, params)
        opening = {
            i: Message(
                RecordDict({**train, "secure": _secure_record(rnd, None, wire.encode(AdvertiseRequest(i, setup)))}),
                dst_node_id=node, message_type=TRAIN_SECURE, ttl=self.timeout, group_id=str(rnd),
            )
            for i, node in nodes.items()
        }
        adverts = self._gather(opening, self.timeout, "training", KeyAdvert, why)
        untrained = set(why)
        for index in sorted(untrained):
            failures.append(ClientFailure(ids[index], why[index].removeprefix("training: ")))
            self._greeted.discard(nodes[index])
        try:
            neighbourhoods = server.collect_adverts(adverts)
            shared = self._stage(rnd, SecureStage.SHARE_KEYS, neighbourhoods, nodes, SharedKeys, why)
            deliveries = server.collect_shares(shared)
            masked = self._stage(rnd, SecureStage.MASKED_INPUT, deliveries, nodes, MaskedInput, why)
            requests = server.collect_masked(masked)
            responses = self._stage(rnd, SecureStage.UNMASK, requests, nodes, UnmaskResponse, why)
            result = server.collect_unmask(responses)
        except SecureAggregationAborted as exc:
            log.warning("round %d: secure aggregation aborted, round skipped: %s", rnd, exc)
            failures.extend(
                ClientFailure(cid, f"secure aggregation aborted: {exc}")
                for i, cid in enumerate(ids) if i not in untrained
            )
            for index in why:
                self._greeted.discard(nodes[index])
            return RoundOutcome((), tuple(failures))
        for index, reason in result.excluded:
            if index in untrained:
                continue
            failures.append(ClientFailure(ids[index], f"secure aggregation: {why.get(index, reason)}"))
            self._greeted.discard(nodes[index])
        return RoundOutcome((aggregate_update(result, setup, task.kind, params.device),), tuple(failures))


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from fedtrain.deploy import DeployRequest, coordinate

    request = DeployRequest.read(Path(str(context.run_config["run-dir"])))

    def make_backend(hello: Hello, secure: SecureDeployment | None) -> FlowerBackend:
        if secure is None:
            return FlowerBackend(grid, hello, request.timeout, request.poll_seconds)
        return SecureFlowerBackend(
            grid, hello, request.timeout, request.poll_seconds, secure.settings, secure.weighted
        )

    coordinate(request, make_backend)


client_app = ClientApp()


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


class _CappedSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the
    same functions, but no sleep longer than ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def run_supernode(poll_seconds: float, argv: Sequence[str]) -> None:
    """``flower-supernode ARGV``, polling its SuperLink every ``poll_seconds``
    when idle instead of every 3 s.

    Flower offers no setting for this poll, which dominates a round's latency
    on a small federation; each idle SuperNode costs its SuperLink one request
    per ``poll_seconds``. Should a Flower release move the loop, the SuperNode
    runs with Flower's own poll and a warning says so.
    """
    import sys

    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedtrain.deploy import FLOWER_IDLE_POLL

    if isinstance(getattr(start_client_internal, "time", None), type(time)):
        start_client_internal.time = _CappedSleep(poll_seconds)  # type: ignore[assignment]
    else:
        log.warning("this Flower release has no SuperNode poll to shorten; polling every %g s", FLOWER_IDLE_POLL)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="flower-supernode with a shorter idle poll")
    parser.add_argument("--poll", type=float, required=True)
    known, rest = parser.parse_known_args()
    run_supernode(known.poll, rest)
