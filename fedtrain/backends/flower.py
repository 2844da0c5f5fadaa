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

Flower's own ``Grid.send_and_receive`` polls every 3 s; the backend pushes
with ``push_messages`` and polls ``pull_messages`` every ``--poll`` seconds
instead (:data:`fedtrain.deploy.DEFAULT_POLL`). torch and the engine are imported inside the
coordinator's code only: the ClientApp relay runs in a fresh process per
message and must stay light.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtrain.relay import NODE_KEY_FILE, NODE_WORKER, ClientInfo, Hello, TrainReply, relay

if TYPE_CHECKING:
    import torch

    from fedtrain.client import TrainTask
    from fedtrain.engine import ClientFailure, RoundOutcome
    from fedtrain.types import ClientUpdate, UpdateKind

log = logging.getLogger(__name__)

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

    def _decode(self, cid: str, reply: Message, kind: UpdateKind) -> ClientUpdate | ClientFailure:
        import torch

        from fedtrain.engine import ClientFailure
        from fedtrain.types import ClientUpdate

        if reply.has_error():
            return ClientFailure(cid, f"client error: {reply.error.reason}")
        try:
            result = reply.content["result"]
            if result.get("status") != "ok":
                return ClientFailure(cid, f"client error: {result.get('reason')}")
            vector = torch.from_numpy(np.ascontiguousarray(reply.content["update"]["update"].numpy()))
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

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        from fedtrain.engine import ClientFailure, RoundOutcome
        from fedtrain.types import ClientUpdate

        self.discover()
        live = set(self.grid.get_node_ids())
        content = RecordDict({
            "params": ArrayRecord({"params": Array(params.detach().cpu().numpy())}),
            "task": ConfigRecord({"round": rnd, "task": json.dumps(task.as_json())}),
        })
        failures: list[ClientFailure] = []
        messages: list[Message] = []
        client_of_node: dict[int, str] = {}
        for cid in clients:
            node = self._node_of.get(cid)
            if node is None or node not in live:
                failures.append(ClientFailure(cid, "not connected"))
                continue
            client_of_node[node] = cid
            messages.append(Message(
                content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.timeout, group_id=str(rnd)
            ))
        replies = self._exchange(messages, self.timeout)
        updates: list[ClientUpdate] = []
        for node, cid in client_of_node.items():
            reply = replies.get(node)
            outcome = (
                ClientFailure(cid, f"no reply within {self.timeout:g} s")
                if reply is None else self._decode(cid, reply, task.kind)
            )
            if isinstance(outcome, ClientUpdate):
                updates.append(outcome)
            else:
                failures.append(outcome)
                self._greeted.discard(node)
        return RoundOutcome(tuple(updates), tuple(failures))


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from fedtrain.deploy import DeployRequest, coordinate

    request = DeployRequest.read(Path(str(context.run_config["run-dir"])))
    coordinate(request, lambda hello: FlowerBackend(grid, hello, request.timeout, request.poll_seconds))


client_app = ClientApp()


def _relay(context: Context, request: tuple[str, object]) -> tuple[str, object]:
    worker = str(context.node_config[NODE_WORKER])
    key = Path(str(context.node_config[NODE_KEY_FILE])).read_text().strip()
    return relay(worker, key, request)


@client_app.query()
def _hello(message: Message, context: Context) -> Message:
    status, answer = _relay(context, ("hello", str(message.content["hello"]["hello"])))
    if status != "ok" or not isinstance(answer, ClientInfo):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({"result": ConfigRecord({
        "status": "ok", "name": answer.name, "num_records": answer.num_records, "device": answer.device,
    })}), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    task = message.content["task"]
    params = message.content["params"]["params"].numpy()
    status, answer = _relay(context, ("train", (int(task["round"]), str(task["task"]), params)))
    if status != "ok" or not isinstance(answer, TrainReply):
        return Message(_status_error(str(answer)), reply_to=message)
    return Message(RecordDict({
        "update": ArrayRecord({"update": Array(np.ascontiguousarray(answer.update, dtype=np.float32))}),
        "result": ConfigRecord({
            "status": "ok", "num_examples": answer.num_examples, "metrics": json.dumps(answer.metrics),
        }),
    }), reply_to=message)


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
