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

Every reply is data from another party, checked field by field where it
enters (:func:`parse_hello_reply`, :func:`parse_train_reply`): a reply that
fails a check leaves its client out of the run (hello) or of the round
(training, recorded in ``metrics.jsonl``'s ``failures``) with the reason,
and never ends the run.

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


MAX_ID_CHARS = 128
"""Longest client id a hello may carry (ids key ``metrics.jsonl``'s ``failures``)."""

MAX_DEVICE_CHARS = 64
"""Longest device name a hello may carry (``cuda:0``, ``cpu``)."""

MAX_REASON_CHARS = 300
"""A client's own error text is cut to this many characters in logs and ``failures``."""

MAX_METRICS_CHARS = 1024
"""Longest metrics JSON a training reply may carry: two known keys with
floats need under 80 characters; the bound is checked before parsing, so a
huge or deeply nested value costs nothing."""

ARRAY_HEADER_BYTES = 4096
"""Slack over ``4 · numel`` bytes for the ``.npy`` header of an update (numpy
writes 128 bytes for a 1-D float32 array)."""

HELLO_KEYS = frozenset({"status", "name", "num_records", "device"})
TRAIN_KEYS = frozenset({"status", "num_examples", "metrics"})
ERROR_KEYS = frozenset({"status", "reason"})


class RejectedReply(ValueError):
    """A client's message that fails a check where it enters the coordinator:
    the message names the field, the value and what is allowed. The client is
    left out (of the run, or of the round); the run goes on."""


class ClientReportedError(RejectedReply):
    """A well-formed reply in which the client says it failed (``status = "error"``)."""


def _clean(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """A client-supplied text fit for a log line and ``metrics.jsonl``: a
    string cut to ``limit`` characters, anything unprintable escaped."""
    raw = text if isinstance(text, str) else f"<{type(text).__name__}>"
    cut = raw[:limit]
    shown = cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")[:limit]
    return shown + ("…" if len(raw) > limit else "")


def _text_field(name: str, value: object, limit: int) -> str:
    """``value`` when it is a printable string of 1 … ``limit`` characters
    without surrounding spaces, else :class:`RejectedReply`."""
    from fedtrain.validation import describe

    if not isinstance(value, str):
        raise RejectedReply(f"{name} = {describe(value)}: expected a string of 1 … {limit} characters")
    if not 1 <= len(value) <= limit or not value.isprintable() or value.strip() != value:
        raise RejectedReply(
            f"{name} = {describe(value)}: expected 1 … {limit} printable characters, no surrounding spaces"
        )
    return value


def _result_record(content: RecordDict, records: frozenset[str], keys: frozenset[str]) -> ConfigRecord:
    """The ``result`` record of a reply that holds exactly ``records``, with
    exactly ``keys``; a client's own error becomes :class:`RejectedReply`."""
    from fedtrain.validation import describe

    names = set(content.keys())
    result = content.get("result") if "result" in names else None
    if not isinstance(result, ConfigRecord):
        raise RejectedReply(f"records {_clean(str(sorted(names)[:8]), 120)}: expected a 'result' config record")
    status = result.get("status")
    if status == "error":
        _check_keys(result, ERROR_KEYS, frozenset({"status"}))
        raise ClientReportedError(f"client error: {_clean(result.get('reason'))}")
    if status != "ok":
        raise RejectedReply(f"status = {describe(status)}: expected 'ok' or 'error'")
    if names != records:
        raise RejectedReply(f"records {_clean(str(sorted(names)[:8]), 120)}: expected exactly {sorted(records)}")
    _check_keys(result, keys, keys)
    return result


def _check_keys(result: ConfigRecord, allowed: frozenset[str], required: frozenset[str]) -> None:
    present = set(result.keys())
    unknown = sorted(present - allowed)
    if unknown:
        raise RejectedReply(f"result: unknown key {_clean(repr(unknown[0]), 60)}; allowed are {sorted(allowed)}")
    missing = sorted(required - present)
    if missing:
        raise RejectedReply(f"result: missing {missing}")


def parse_hello_reply(content: RecordDict, min_records: int = 1) -> ClientInfo:
    """The :class:`ClientInfo` of a hello reply, every field checked where it
    enters: ``name`` a printable id of at most :data:`MAX_ID_CHARS`
    characters, ``num_records`` an integer in ``min_records`` …
    :data:`fedtrain.types.MAX_RECORDS` (``min_records`` is
    ``privacy.min_records`` under sample-level DP), ``device`` a short
    printable name, nothing else. Raises :class:`RejectedReply`."""
    from fedtrain.privacy.sample_level import size_refusal

    try:
        result = _result_record(content, frozenset({"result"}), HELLO_KEYS)
        name = _text_field("name", result.get("name"), MAX_ID_CHARS)
        count = result.get("num_records")
        reason = size_refusal(count, min_records)  # type: ignore[arg-type]
        if reason is not None:
            raise RejectedReply(reason)
        device = _text_field("device", result.get("device"), MAX_DEVICE_CHARS)
    except RejectedReply:
        raise
    except Exception as exc:  # whatever a hostile record does, it is this client's failure
        raise RejectedReply(f"malformed hello reply: {type(exc).__name__}: {_clean(str(exc))}") from None
    return ClientInfo(name, int(count), device)  # type: ignore[arg-type]


def _metrics(text: object) -> dict[str, float]:
    from fedtrain.validation import metrics_reason

    if not isinstance(text, str) or len(text) > MAX_METRICS_CHARS:
        shown = f"{len(text)} characters" if isinstance(text, str) else f"a {type(text).__name__}"
        raise RejectedReply(f"metrics = {shown}: expected a JSON object of at most {MAX_METRICS_CHARS} characters")
    try:
        metrics = json.loads(text)
    except Exception as exc:  # bad JSON, nesting past the recursion limit
        raise RejectedReply(f"metrics: not JSON ({type(exc).__name__})") from None
    if not isinstance(metrics, dict):
        raise RejectedReply(f"metrics = a {type(metrics).__name__}: expected a JSON object")
    reason = metrics_reason(metrics)
    if reason is not None:
        raise RejectedReply(reason)
    return metrics


def _update_vector(content: RecordDict, numel: int) -> np.ndarray:
    record = content.get("update")
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["update"]:
        raise RejectedReply("update: expected an array record holding exactly one array, 'update'")
    array = record["update"]
    if not isinstance(array, Array):
        raise RejectedReply(f"update = a {type(array).__name__}: expected an array")
    if array.stype != "numpy.ndarray" or array.dtype != "float32" or tuple(array.shape) != (numel,):
        raise RejectedReply(
            f"update = {_clean(array.stype, 40)} {_clean(array.dtype, 20)} of shape {_clean(str(array.shape), 60)}: "
            f"expected a numpy.ndarray float32 of shape ({numel},)"
        )
    if not isinstance(array.data, bytes):
        raise RejectedReply(f"update data = a {type(array.data).__name__}: expected bytes")
    if len(array.data) > 4 * numel + ARRAY_HEADER_BYTES:
        raise RejectedReply(f"update: {len(array.data)} bytes, more than a float32 vector of {numel} values")
    try:
        vector = array.numpy()  # np.load(..., allow_pickle=False): never unpickled
    except Exception as exc:  # not .npy bytes, or an object array
        raise RejectedReply(
            f"update: its bytes are not a .npy array ({type(exc).__name__}: {_clean(str(exc))})"
        ) from None
    if not isinstance(vector, np.ndarray) or vector.dtype != np.dtype(np.float32) or vector.shape != (numel,):
        raise RejectedReply(f"update: its bytes do not hold the float32 vector of shape ({numel},) it declares")
    return vector


def parse_train_reply(content: RecordDict, numel: int) -> tuple[np.ndarray, int, dict[str, float]]:
    """The update vector, ``num_examples`` and metrics of a training reply,
    each checked where it enters: a native float32 vector of ``numel``
    values, an integer count in 1 … :data:`fedtrain.types.MAX_RECORDS`, and
    metrics that :func:`fedtrain.validation.metrics_reason` accepts (finite
    floats, known keys). Raises :class:`RejectedReply`."""
    from fedtrain.types import MAX_RECORDS
    from fedtrain.validation import count_reason

    try:
        result = _result_record(content, frozenset({"result", "update"}), TRAIN_KEYS)
        count = result.get("num_examples")
        reason = count_reason("num_examples", count, 1, MAX_RECORDS)
        if reason is not None:
            raise RejectedReply(reason)
        metrics = _metrics(result.get("metrics"))
        vector = _update_vector(content, numel)
    except RejectedReply:
        raise
    except Exception as exc:  # whatever a hostile record does, it is this client's failure
        raise RejectedReply(f"malformed training reply: {type(exc).__name__}: {_clean(str(exc))}") from None
    return vector, int(count), metrics  # type: ignore[arg-type]


class FlowerBackend:
    """Carries rounds to SuperNodes through a Flower ``Grid``.

    Clients are known by the id they answer the hello with (their partition,
    or the name of their own data set), so the engine, the sampler and the
    privacy ledger see the same ids as in a simulation; the map to Flower
    node ids is refreshed every round, so a client that restarts (same key,
    same node id) or reconnects is found again.

    Every reply is checked where it enters (:func:`parse_hello_reply`,
    :func:`parse_train_reply`): a malformed hello leaves that node out with a
    logged reason, a malformed training reply fails that client for the
    round; neither ends the run. ``min_records`` is the fewest records a
    client may join with (``privacy.min_records`` under sample-level DP,
    :func:`fedtrain.privacy.sample_level.min_records`), and a client that
    rejoins keeps the record count it first joined with.
    """

    ids_follow_keys = False
    """Whether a client id, once claimed, stays with that node for the run.
    Node ids follow registered keys, so the coordinator sets this when
    clients authenticate (:func:`fedtrain.deploy.coordinate`): no other key
    can take over an id, even while its holder is away. Without keys
    (``--insecure``) a restarted client is a new node and may claim its id
    again once the old node is gone."""

    def __init__(
        self, grid: Grid, hello: Hello, timeout: float, poll_seconds: float, min_records: int = 1
    ) -> None:
        self.grid = grid
        self.hello = hello
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.min_records = min_records
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
            reason = self.admit(node, reply)
            if reason is not None:
                log.warning("node %d left out: %s", node, reason)

    def admit(self, node: int, reply: Message) -> str | None:
        """Register the client that ``node`` answered the hello with; why it
        was left out, or None when it joined."""
        if reply.has_error():
            return f"refused the run: {_clean(reply.error.reason)}"
        try:
            info = parse_hello_reply(reply.content, self.min_records)
        except RejectedReply as exc:
            return str(exc)
        holder = self._node_of.get(info.name)
        if holder is not None and holder != node and (self.ids_follow_keys or holder in self.grid.get_node_ids()):
            return f"claims client id {info.name}, which node {holder} (another key) holds in this run"
        known = self.clients.get(info.name)
        if known is not None and known.num_records != info.num_records:
            return (
                f"client {info.name} joined with {known.num_records} records and now declares "
                f"{info.num_records}; the run weights and accounts it by the first count"
            )
        self._node_of[info.name] = node
        self.clients[info.name] = info
        log.warning("client %s joined (node %d, %d records, %s)", info.name, node, info.num_records, info.device)
        return None

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
        self, cid: str, reply: Message, kind: UpdateKind, params: torch.Tensor
    ) -> ClientUpdate | ClientFailure:
        """Client ``cid``'s update from its training ``reply``, or its failure."""
        import torch

        from fedtrain.engine import ClientFailure
        from fedtrain.types import ClientUpdate

        if reply.has_error():
            return ClientFailure(cid, f"client error: {_clean(reply.error.reason)}")
        try:
            vector, num_examples, metrics = parse_train_reply(reply.content, params.numel())
        except ClientReportedError as exc:
            return ClientFailure(cid, str(exc))
        except RejectedReply as exc:
            return ClientFailure(cid, f"malformed reply: {exc}")
        registered = self.clients[cid].num_records
        if num_examples != registered:
            return ClientFailure(
                cid, f"declared {num_examples} examples, but joined with {registered} records"
            )
        return ClientUpdate(cid, torch.from_numpy(vector).to(params.device), num_examples, kind, metrics)

    def _connected(
        self, clients: Sequence[str], task: TrainTask
    ) -> tuple[dict[str, int], list[ClientFailure]]:
        """The node of each of ``clients`` that is connected and may train
        under ``task``'s privacy setting, and a failure for each other."""
        from fedtrain.engine import ClientFailure

        self.discover()
        live = set(self.grid.get_node_ids())
        nodes: dict[str, int] = {}
        failures: list[ClientFailure] = []
        for cid in clients:
            node = self._node_of.get(cid)
            refusal = task.privacy.refusal(cid)
            if refusal is not None:
                failures.append(ClientFailure(cid, refusal))
            elif node is None or node not in live:
                failures.append(ClientFailure(cid, "not connected"))
            else:
                nodes[cid] = node
        return nodes, failures

    def _train_content(self, rnd: int, task: TrainTask, params: torch.Tensor | ArrayRecord) -> RecordDict:
        """A training message's content: the model (or an already built
        record of it, shared by the round's messages) and the task."""
        weights = params if isinstance(params, ArrayRecord) else self._model_record(params)
        return RecordDict({
            "params": weights,
            "task": ConfigRecord({"round": rnd, "task": json.dumps(task.as_json())}),
        })

    @staticmethod
    def _model_record(params: torch.Tensor) -> ArrayRecord:
        return ArrayRecord({"params": Array(params.detach().cpu().numpy())})

    @staticmethod
    def _own_task(task: TrainTask, cid: str) -> TrainTask:
        """``task`` as client ``cid`` gets it: its own DP-SGD noise, nothing about the other clients."""
        from dataclasses import replace

        return replace(task, privacy=task.privacy.for_client(cid))

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        from fedtrain.engine import ClientFailure, RoundOutcome
        from fedtrain.types import ClientUpdate

        nodes, failures = self._connected(clients, task)
        weights = self._model_record(params)
        messages = [
            Message(
                self._train_content(rnd, self._own_task(task, cid), weights),
                dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.timeout, group_id=str(rnd),
            )
            for cid, node in nodes.items()
        ]
        replies = self._exchange(messages, self.timeout)
        updates: list[ClientUpdate] = []
        for cid, node in nodes.items():
            reply = replies.get(node)
            outcome = (
                ClientFailure(cid, f"no reply within {self.timeout:g} s")
                if reply is None else self._decode(cid, reply, task.kind, params)
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
        return f"client error: {_clean(reply.error.reason)}"
    try:
        result = reply.content["result"]
        status = result.get("status")
    except Exception as exc:  # a malformed reply is this client's failure
        return f"malformed reply: {type(exc).__name__}: {_clean(str(exc))}"
    if status != "ok":
        return f"client error: {_clean(result.get('reason'))}"
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
        settings: SecureSettings, weighted: bool, min_records: int = 1,
    ) -> None:
        super().__init__(grid, hello, timeout, poll_seconds, min_records)
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

        connected, failures = self._connected(clients, task)
        if not connected:
            return RoundOutcome((), tuple(failures))
        ids = sorted(connected, key=lambda c: (len(c), c))
        nodes = {i: connected[cid] for i, cid in enumerate(ids)}
        noise = task.privacy.distributed_noise
        graph = self.settings.graph(len(ids))
        setup = self.settings.setup(
            graph,
            vector_length=params.numel(),
            noise_stddev=noise / math.sqrt(len(clients)) if noise > 0 else 0.0,
            weighted=self.weighted and noise == 0,
        )
        server = SecureServer(setup, graph)
        why: dict[int, str] = {}
        weights = self._model_record(params)
        opening = {
            i: Message(
                RecordDict({
                    **self._train_content(rnd, self._own_task(task, ids[i]), weights),
                    "secure": _secure_record(rnd, None, wire.encode(AdvertiseRequest(i, setup))),
                }),
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
        from fedtrain.config import from_dict
        from fedtrain.privacy.sample_level import min_records

        floor = min_records(from_dict(hello.config))
        if secure is None:
            return FlowerBackend(grid, hello, request.timeout, request.poll_seconds, floor)
        return SecureFlowerBackend(
            grid, hello, request.timeout, request.poll_seconds, secure.settings, secure.weighted, floor
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
