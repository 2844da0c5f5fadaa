"""The coordinator's side of a deployment over Flower: the transport that
carries each round's task to the SuperNodes and their updates back.

:class:`FlowerTransport` (and :class:`SecureFlowerTransport` under secure
aggregation) is what the deployed coordinator hands the engine in place of
a simulation's in-process executor, inside the Flower ``ServerApp`` of
``fedtrain server``: it pushes messages through Flower's ``Grid``, and the
SuperNodes' ClientApp (:mod:`fedtrain.transport.flower_client_app`, a relay
to each client's warm worker) answers them.

Messages (Flower's Message API, ``flwr.app``):

- ``query`` (hello) → the run's config and model shape; reply: the client's
  id, record count and device.
- ``train`` → the flat float32 global model (record ``params``) or, under
  ``compression.down``, a delta against the client's own copy (records
  ``delta`` and ``downlink``, :meth:`FlowerTransport.model_for`), and the
  round's :class:`~fedtrain.training.trainer.TrainTask` as JSON; reply: the flat update
  (record ``update``) or, under ``compression.up``, its compressed fields
  (record ``compressed``, :data:`~fedtrain.transport.relay.COMPRESSED_BYTES`),
  the record count and the metrics, or ``status = "error"`` with a reason. A
  compressed update reaches the engine as a
  :class:`~fedtrain.compression.CompressedUpdate`, decoded at intake.

Tensors (the model down, the update up, every secure-aggregation payload)
travel as Flower ``Array`` objects of raw little-endian bytes
(:data:`fedtrain.transport.relay.RAW_STYPE`): no ``.npy`` header, no base64,
no JSON around them; Flower cuts each into 5 MiB chunks itself.
:func:`record_bytes` counts what a message carries, and every round logs
the payload bytes sent and received (:class:`WireTraffic`).

Every reply is data from another party, checked field by field where it
enters (:func:`parse_hello_reply`, :func:`parse_train_reply`): a reply that
fails a check leaves its client out of the run (hello) or of the round
(training, recorded in ``metrics.jsonl``'s ``failures``) with the reason,
and never ends the run.

Under secure aggregation (:class:`SecureFlowerTransport`) ``train`` becomes:

- ``train.secure`` → the model, the task and the round's encoded
  ``AdvertiseRequest``; the client trains, keeps its update, and replies
  with its encoded ``KeyAdvert``;
- ``query.secure`` (``stage`` = share keys, masked input, unmask) → the
  coordinator's stage message; reply: the client's. Payloads are
  :mod:`fedtrain.secure.wire`'s binary encoding, carried as a ``uint8``
  ``Array`` (record ``payload``) and decoded without trust on both sides;
  the clear update never leaves the client.

Flower's own ``Grid.send_and_receive`` polls every 3 s; the transport pushes
with ``push_messages`` and polls ``pull_messages`` every ``--poll`` seconds
instead (:data:`fedtrain.transport.relay.DEFAULT_POLL`). torch is imported inside the methods that
need it only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtrain.transport.relay import (
    COMPRESSED_BYTES,
    COMPRESSED_INTS,
    RAW_STYPE,
    ClientInfo,
    Hello,
    SecureStage,
    WireDtype,
    raw_bytes,
    raw_vector,
)

if TYPE_CHECKING:
    import torch

    from fedtrain.compression import ClientCopies, Compressed

    from fedtrain.training.executor import UpdateSink
    from fedtrain.training.train_task import TrainTask
    from fedtrain.types import ClientFailure, RoundOutcome
    from fedtrain.secure.messages import (
        AdvertiseRequest,
        KeyAdvert,
        MaskedInput,
        Neighbourhood,
        ShareDelivery,
        SharedKeys,
        UnmaskRequest,
        UnmaskResponse,
    )
    from fedtrain.secure.round import Replies
    from fedtrain.secure.setting import SecureSettings
    from fedtrain.types import ClientUpdate, UpdateKind

log = logging.getLogger(__name__)

M = TypeVar("M")

HELLO_SECONDS = 120.0
"""How long a client may take to load its data and build the model."""

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

FINGERPRINT_CHARS = 64
"""A frozen-model fingerprint: SHA-256 as hex (:func:`fedtrain.layout.frozen_fingerprint`)."""

HELLO_KEYS = frozenset({"status", "name", "num_records", "device", "fingerprint"})
TRAIN_KEYS = frozenset({"status", "num_examples", "metrics"})
COMPRESSED_TRAIN_KEYS = TRAIN_KEYS | frozenset(COMPRESSED_INTS)
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
        fingerprint = _text_field("fingerprint", result.get("fingerprint"), FINGERPRINT_CHARS)
        if len(fingerprint) != FINGERPRINT_CHARS or fingerprint.strip("0123456789abcdef"):
            raise RejectedReply(f"fingerprint = {fingerprint!r}: expected {FINGERPRINT_CHARS} lowercase hex digits")
    except RejectedReply:
        raise
    except Exception as exc:  # whatever a hostile record does, it is this client's failure
        raise RejectedReply(f"malformed hello reply: {type(exc).__name__}: {_clean(str(exc))}") from None
    return ClientInfo(name, int(count), device, fingerprint)  # type: ignore[arg-type]


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


def float32_array(vector: np.ndarray) -> Array:
    """``vector`` (1-D) as a Flower ``Array`` of raw little-endian float32 bytes."""
    return Array(dtype=WireDtype.FLOAT32.value, shape=(int(vector.size),), stype=RAW_STYPE,
                 data=raw_bytes(vector, WireDtype.FLOAT32))


def bytes_array(data: bytes) -> Array:
    """``data`` as a Flower ``Array`` of ``uint8`` (Flower chunks it when large)."""
    return Array(dtype=WireDtype.UINT8.value, shape=(len(data),), stype=RAW_STYPE, data=bytes(data))


def _single_array(content: RecordDict, name: str) -> Array:
    """The one ``Array`` of ``content``'s array record ``name``, which holds nothing else."""
    record = content.get(name)
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [name]:
        raise RejectedReply(f"{name}: expected an array record holding exactly one array, {name!r}")
    array = record[name]
    if not isinstance(array, Array):
        raise RejectedReply(f"{name} = a {type(array).__name__}: expected an array")
    return array


def _update_vector(content: RecordDict, numel: int) -> np.ndarray:
    """The update of a training reply: a read-only view of its raw float32 bytes."""
    array = _single_array(content, "update")
    try:
        return raw_vector("update", array.stype, array.dtype, tuple(array.shape), array.data,
                          WireDtype.FLOAT32, numel)
    except ValueError as exc:
        raise RejectedReply(_clean(str(exc))) from None


def payload_bytes(content: RecordDict) -> bytes:
    """The secure-aggregation payload of a message or reply (array record
    ``payload``: one ``uint8`` raw ``Array``), checked field by field;
    :mod:`fedtrain.secure.wire` decodes it. Raises :class:`RejectedReply`."""
    array = _single_array(content, "payload")
    try:
        raw_vector("payload", array.stype, array.dtype, tuple(array.shape), array.data, WireDtype.UINT8)
    except ValueError as exc:
        raise RejectedReply(_clean(str(exc))) from None
    return array.data


def record_bytes(content: RecordDict) -> int:
    """The payload bytes a message's records carry, as Flower sends them:
    every ``Array``'s ``data``, every ``bytes`` and UTF-8 ``str`` value, and
    8 bytes per number, lists summed; names and Flower's own framing
    (object headers, protobuf, HTTP/2, TLS) are not counted. The coordinator
    reports it per round (:class:`WireTraffic`) to compare with what
    ``metrics.jsonl`` says crossed (``bytes_up`` / ``bytes_down``)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else (value,):
                if isinstance(item, bytes):
                    total += len(item)
                elif isinstance(item, str):
                    total += len(item.encode("utf-8"))
                else:
                    total += 8
    return total


@dataclass
class WireTraffic:
    """What the coordinator pushed and pulled in one round, counted by
    :func:`record_bytes` as each message goes out and each reply comes in
    (hellos are not counted). Mutable: the transport adds to it."""

    sent_bytes: int = 0
    sent_messages: int = 0
    received_bytes: int = 0
    received_messages: int = 0

    def sent_(self, message: Message) -> None:
        self.sent_bytes += record_bytes(message.content)
        self.sent_messages += 1

    def received_(self, reply: Message) -> None:
        if not reply.has_error():
            self.received_bytes += record_bytes(reply.content)
        self.received_messages += 1

    def describe(self, rnd: int) -> str:
        """The round's log line (read by the deployment tests)."""
        return (f"round {rnd} wire: sent {self.sent_bytes} payload bytes in {self.sent_messages} messages, "
                f"received {self.received_bytes} payload bytes in {self.received_messages} replies")


def _compressed_payload(content: RecordDict, result: ConfigRecord, numel: int) -> Compressed:
    """The compressed update of a training reply: record ``compressed``
    holds exactly the ``uint8`` raw arrays of :data:`COMPRESSED_BYTES`, and
    :func:`fedtrain.compression.from_wire` checks them with ``result``'s
    integer fields against ``numel`` (a declared size is never trusted)."""
    from fedtrain.compression import from_wire

    record = content.get("compressed")
    if not isinstance(record, ArrayRecord) or sorted(record.keys()) != sorted(COMPRESSED_BYTES):
        keys = sorted(record.keys())[:8] if isinstance(record, ArrayRecord) else type(record).__name__
        raise RejectedReply(
            f"compressed: {_clean(str(keys), 120)}: expected an array record of exactly {sorted(COMPRESSED_BYTES)}"
        )
    fields: dict[str, object] = {key: result.get(key) for key in COMPRESSED_INTS}
    for key in COMPRESSED_BYTES:
        array = record[key]
        if not isinstance(array, Array):
            raise RejectedReply(f"compressed {key} = a {type(array).__name__}: expected an array")
        try:
            raw_vector(f"compressed {key}", array.stype, array.dtype, tuple(array.shape), array.data,
                       WireDtype.UINT8)
        except ValueError as exc:
            raise RejectedReply(_clean(str(exc))) from None
        fields[key] = array.data
    try:
        return from_wire(fields, numel)
    except ValueError as exc:
        raise RejectedReply(_clean(str(exc))) from None


def parse_train_reply(content: RecordDict, numel: int) -> tuple[np.ndarray | Compressed, int, dict[str, float]]:
    """The update, ``num_examples`` and metrics of a training reply, each
    checked where it enters: the update is either a native float32 vector of
    ``numel`` values (record ``update``) or a compressed one (record
    ``compressed`` and the integer fields in ``result``, exactly one of the
    two, :func:`_compressed_payload`), the count an integer in 1 …
    :data:`fedtrain.types.MAX_RECORDS`, and metrics that
    :func:`fedtrain.validation.metrics_reason` accepts (finite floats, known
    keys). Raises :class:`RejectedReply`."""
    from fedtrain.types import MAX_RECORDS
    from fedtrain.validation import count_reason

    try:
        names = set(content.keys())
        if {"update", "compressed"} <= names:
            raise RejectedReply("records 'update' and 'compressed': a training reply carries exactly one of them")
        compressed = "compressed" in names
        head = content.get("result") if "result" in names else None
        if not compressed and "update" not in names and isinstance(head, ConfigRecord) and head.get("status") == "ok":
            raise RejectedReply(
                f"records {_clean(str(sorted(names)[:8]), 120)}: a training reply carries exactly one of "
                "'update' (float32) and 'compressed' (compression.up)"
            )
        result = _result_record(
            content, frozenset({"result", "compressed" if compressed else "update"}),
            COMPRESSED_TRAIN_KEYS if compressed else TRAIN_KEYS,
        )
        count = result.get("num_examples")
        reason = count_reason("num_examples", count, 1, MAX_RECORDS)
        if reason is not None:
            raise RejectedReply(reason)
        metrics = _metrics(result.get("metrics"))
        update = _compressed_payload(content, result, numel) if compressed else _update_vector(content, numel)
    except RejectedReply:
        raise
    except Exception as exc:  # whatever a hostile record does, it is this client's failure
        raise RejectedReply(f"malformed training reply: {type(exc).__name__}: {_clean(str(exc))}") from None
    return update, int(count), metrics  # type: ignore[arg-type]


class FlowerTransport:
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
    clients authenticate (the deployed coordinator does): no other key
    can take over an id, even while its holder is away. Without keys
    (``--insecure``) a restarted client is a new node and may claim its id
    again once the old node is gone."""

    def __init__(
        self, grid: Grid, hello: Hello, timeout: float, poll_seconds: float, min_records: int = 1,
        copies: ClientCopies | None = None,
    ) -> None:
        self.grid = grid
        self.hello = hello
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.min_records = min_records
        self.copies = copies
        """``compression.down``: each client's copy of the model (None sends every client float32)."""
        self.clients: dict[str, ClientInfo] = {}
        self._node_of: dict[str, int] = {}
        self._greeted: set[int] = set()
        self.traffic = WireTraffic()
        """The current (or last) round's :class:`WireTraffic`."""
        self.model_bytes = 0
        """What the current (or last) round's models cost, as ``metrics.jsonl``
        counts it (:class:`fedtrain.compression.ModelSender`)."""

    def _exchange(
        self, messages: Sequence[Message], timeout: float, on_reply: Callable[[int, Message], None] | None = None,
        counted: bool = True,
    ) -> dict[int, Message]:
        """Push ``messages``; the replies that arrive within ``timeout``, by
        node id. With ``on_reply``, each reply is handed to it (node id,
        reply) as it is pulled and not kept (the result is then empty).
        When ``counted``, what goes out and comes in is added to :attr:`traffic`."""
        if not messages:
            return {}
        node_of_message = {}
        for message_id, message in zip(self.grid.push_messages(messages), messages):
            node_of_message[message_id] = message.metadata.dst_node_id
            if counted:
                self.traffic.sent_(message)
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        pending = set(node_of_message)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                node = node_of_message[reply.metadata.reply_to_message_id]
                if counted:
                    self.traffic.received_(reply)
                if on_reply is None:
                    replies[node] = reply
                else:
                    on_reply(node, reply)
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
        for node, reply in self._exchange(messages, HELLO_SECONDS, counted=False).items():
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
        if self.hello.fingerprint and info.fingerprint != self.hello.fingerprint:
            return (
                f"client {info.name}'s frozen model differs from the coordinator's (fingerprint "
                f"{info.fingerprint[:12]}…, expected {self.hello.fingerprint[:12]}…): both must build the same "
                "model from the same config and weights (model.name, model.lora, the folder of an hf: model)"
            )
        known = self.clients.get(info.name)
        if known is not None and known.num_records != info.num_records:
            return (
                f"client {info.name} joined with {known.num_records} records and now declares "
                f"{info.num_records}; the run weights and accounts it by the first count"
            )
        self._node_of[info.name] = node
        self.clients[info.name] = info
        if self.copies is not None:
            self.copies.forget_(info.name)
        log.info("client %s joined (node %d, %d records, %s)", info.name, node, info.num_records, info.device)
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

    def decode(
        self, cid: str, reply: Message, kind: UpdateKind, params: torch.Tensor, row: torch.Tensor | None = None
    ) -> ClientUpdate | ClientFailure:
        """Client ``cid``'s update from its training ``reply``, or its failure.
        The checked bytes are copied once: into ``row`` (a sink's row) when
        given, else into a fresh tensor; a compressed update stays a
        :class:`~fedtrain.compression.CompressedUpdate` (the engine's intake
        decodes it into the row)."""
        import torch

        from fedtrain.types import ClientFailure
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
        if not isinstance(vector, np.ndarray):
            from fedtrain.compression import CompressedUpdate

            return CompressedUpdate(
                client_id=cid, vector=torch.empty(0), num_examples=num_examples, kind=kind, metrics=metrics,
                payload=vector,
            )
        if row is not None and row.device.type == "cpu":
            np.copyto(row.numpy(), vector)
            tensor = row
        else:
            tensor = torch.from_numpy(vector.copy()).to(params.device)
        return ClientUpdate(cid, tensor, num_examples, kind, metrics)

    def connected(
        self, clients: Sequence[str], task: TrainTask
    ) -> tuple[dict[str, int], list[ClientFailure]]:
        """The node of each of ``clients`` that is connected and may train
        under ``task``'s privacy setting, and a failure for each other."""
        from fedtrain.types import ClientFailure

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

    def reachable(self, clients: Sequence[str]) -> list[str]:
        """Those of ``clients`` whose node is connected now, in their order,
        after greeting the nodes that (re)connected."""
        self.discover()
        live = set(self.grid.get_node_ids())
        return [cid for cid in clients if self._node_of.get(cid) in live]

    def train_content(self, rnd: int, task: TrainTask, model: Mapping[str, ArrayRecord | ConfigRecord]) -> RecordDict:
        """A training message's content: the model's records (:meth:`model_for`) and the task."""
        return RecordDict({
            **model,
            "task": ConfigRecord({"round": rnd, "task": json.dumps(task.as_json())}),
        })

    def model_for(
        self, cid: str, rnd: int, params: torch.Tensor, shared: ArrayRecord | None
    ) -> dict[str, ArrayRecord | ConfigRecord]:
        """The records that carry the model to client ``cid``: ``params``
        (float32; ``shared`` is the round's one record of it) or, under
        ``compression.down``, a delta against the client's copy
        (:meth:`fedtrain.compression.ClientCopies.message_`): record
        ``delta`` (the ``uint8`` arrays of :data:`COMPRESSED_BYTES`) and
        record ``downlink`` (``digest`` of the copy after it, ``base`` of the
        copy it applies to, and the integer fields), or ``params`` with
        ``downlink`` holding the digest alone. Adds the cost to :attr:`model_bytes`."""
        from fedtrain.compression import to_wire, uncompressed_nbytes

        if self.copies is None:
            self.model_bytes += uncompressed_nbytes(params.numel())
            return {"params": shared if shared is not None else self.model_record(params)}
        message = self.copies.message_(cid, rnd, params)
        self.model_bytes += message.nbytes
        if message.delta is None:
            return {"params": self.model_record(params if message.full is None else message.full),
                    "downlink": ConfigRecord({"digest": message.digest, "base": ""})}
        fields = to_wire(message.delta)
        row: dict[str, int | str] = {"digest": message.digest, "base": message.base}
        row.update({k: int(fields[k]) for k in COMPRESSED_INTS})
        return {"delta": ArrayRecord({k: bytes_array(cast(bytes, fields[k])) for k in COMPRESSED_BYTES}),
                "downlink": ConfigRecord(row)}

    def lost_(self, cid: str, node: int) -> None:
        """Client ``cid`` failed the round: it is greeted again before the
        next (it may have restarted) and its next model is sent whole."""
        self._greeted.discard(node)
        if self.copies is not None:
            self.copies.forget_(cid)

    @staticmethod
    def model_record(params: torch.Tensor) -> ArrayRecord:
        return ArrayRecord({"params": float32_array(params.detach().cpu().numpy())})

    @staticmethod
    def own_task(task: TrainTask, cid: str) -> TrainTask:
        """``task`` as client ``cid`` gets it: its own DP-SGD noise, nothing about the other clients."""
        from dataclasses import replace

        return replace(task, privacy=task.privacy.for_client(cid))

    def train_round(
        self,
        rnd: int,
        clients: Sequence[str],
        task: TrainTask,
        params: torch.Tensor,
        sink: UpdateSink | None = None,
    ) -> RoundOutcome:
        """Send the round's task to each connected client; with a ``sink``,
        each reply is decoded and pushed into it as it arrives (the decoded
        update copied into the sink's row, the message dropped), so the
        coordinator never holds the cohort's updates."""
        from fedtrain.types import ClientFailure, RoundOutcome
        from fedtrain.types import ClientUpdate

        nodes, failures = self.connected(clients, task)
        self.traffic = WireTraffic()
        self.model_bytes = 0
        weights = self.model_record(params) if self.copies is None else None
        messages = [
            Message(
                self.train_content(rnd, self.own_task(task, cid), self.model_for(cid, rnd, params, weights)),
                dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.timeout, group_id=str(rnd),
            )
            for cid, node in nodes.items()
        ]
        updates: list[ClientUpdate] = []
        if sink is not None:
            cid_of = {node: cid for cid, node in nodes.items()}
            lost: dict[str, ClientFailure] = {}
            replied: set[int] = set()

            def fold(node: int, reply: Message) -> None:
                replied.add(node)
                cid = cid_of[node]
                decoded = self.decode(cid, reply, task.kind, params, sink.row())
                if isinstance(decoded, ClientUpdate):
                    sink.push(decoded)
                else:
                    lost[cid] = decoded

            self._exchange(messages, self.timeout, fold)
            for cid, node in nodes.items():
                failure = lost.get(cid) or (
                    None if node in replied else ClientFailure(cid, f"no reply within {self.timeout:g} s")
                )
                if failure is not None:
                    failures.append(failure)
                    self.lost_(cid, node)
            log.info("%s", self.traffic.describe(rnd))
            return RoundOutcome((), tuple(failures))
        replies = self._exchange(messages, self.timeout)
        for cid, node in nodes.items():
            reply = replies.get(node)
            outcome = (
                ClientFailure(cid, f"no reply within {self.timeout:g} s")
                if reply is None else self.decode(cid, reply, task.kind, params)
            )
            if isinstance(outcome, ClientUpdate):
                updates.append(outcome)
            else:
                failures.append(outcome)
                self.lost_(cid, node)
        log.info("%s", self.traffic.describe(rnd))
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


def _secure_records(rnd: int, stage: SecureStage | None, payload: bytes) -> dict[str, ConfigRecord | ArrayRecord]:
    """A secure message's records: ``secure`` (the round, the stage after
    training) and ``payload`` (the encoded message as raw bytes)."""
    row: dict[str, int | str] = {"round": rnd}
    if stage is not None:
        row["stage"] = stage.value
    return {"secure": ConfigRecord(row), "payload": ArrayRecord({"payload": bytes_array(payload)})}


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


class _FlowerChannel:
    """The :class:`~fedtrain.secure.round.SecureChannel` of one secure round
    over Flower messages; client ``i`` is node ``nodes[i]``.

    The opening is ``train.secure``: the training task (each client its own,
    :meth:`FlowerTransport.own_task`), the model and the client's encoded
    :class:`~fedtrain.secure.messages.AdvertiseRequest`; the client trains,
    keeps its update and answers with its key advert. A client lost there
    failed its training, and the reason says so as it is (``no reply within
    …``, ``client error: …``). The later stages are ``query.secure``, each
    waiting at most :data:`STAGE_SECONDS` (or the client timeout); a client
    that misses one, answers with an error or sends a message that does not
    decode (:mod:`fedtrain.secure.wire`) is a dropout, its reason prefixed
    with the stage (``masked_input: malformed reply: …``).
    """

    def __init__(
        self, transport: FlowerTransport, rnd: int, task: TrainTask, params: torch.Tensor,
        ids: Sequence[str], nodes: Mapping[int, int],
    ) -> None:
        self.transport = transport
        self.rnd = rnd
        self.task = task
        self.params = params
        self.ids = ids
        self.nodes = nodes

    def _gather(self, messages: Mapping[int, Message], seconds: float, stage: str, expected: type[M]) -> Replies[M]:
        """Send each client index its message; the decoded replies that came
        in time, each checked to come from the index it was sent to, and the
        reason of each client that did not answer properly."""
        from fedtrain.secure import wire
        from fedtrain.secure.round import Replies

        index_of_node = {m.metadata.dst_node_id: index for index, m in messages.items()}
        started = time.perf_counter()
        replies = self.transport._exchange(list(messages.values()), seconds)
        log.info("secure aggregation, %s: %d of %d replies in %.2f s",
                 stage, len(replies), len(messages), time.perf_counter() - started)
        out: list[M] = []
        why: dict[int, str] = {}
        for node, index in index_of_node.items():
            reply = replies.get(node)
            error = f"no reply within {seconds:g} s" if reply is None else _reply_error(reply)
            if reply is not None and error is None:
                try:
                    if set(reply.content.keys()) != {"result", "payload"}:
                        raise ValueError(f"records {_clean(str(sorted(reply.content.keys())[:8]), 120)}: "
                                         "expected exactly ['payload', 'result']")
                    decoded = wire.decode(payload_bytes(reply.content), expected)
                    sender = getattr(decoded, "sender")
                    if sender != index:
                        raise ValueError(f"sender {sender}, but the message went to client {index}")
                    out.append(decoded)
                except Exception as exc:  # anything malformed leaves this client out, never the round
                    error = f"malformed reply: {_clean(str(exc))}"
            if error is not None:
                why[index] = error
        return Replies(tuple(out), why)

    def _stage(self, stage: SecureStage, outgoing: Mapping[int, object], expected: type[M]) -> Replies[M]:
        """One ``query.secure`` stage: each client's ``outgoing`` message out, the replies back."""
        from fedtrain.secure import wire
        from fedtrain.secure.round import Replies

        seconds = min(self.transport.timeout, STAGE_SECONDS)
        messages = {
            index: Message(
                RecordDict(_secure_records(self.rnd, stage, wire.encode(message))),
                dst_node_id=self.nodes[index], message_type=QUERY_SECURE, ttl=seconds, group_id=str(self.rnd),
            )
            for index, message in outgoing.items()
        }
        replies = self._gather(messages, seconds, stage.value, expected)
        return Replies(replies.messages, {i: f"{stage.value}: {why}" for i, why in replies.dropped.items()})

    def advertise(self, requests: Mapping[int, AdvertiseRequest]) -> Replies[KeyAdvert]:
        from fedtrain.secure import wire
        from fedtrain.secure.messages import KeyAdvert

        transport, rnd = self.transport, self.rnd
        weights = transport.model_record(self.params) if transport.copies is None else None
        opening = {
            i: Message(
                RecordDict({
                    **transport.train_content(rnd, transport.own_task(self.task, self.ids[i]),
                                               transport.model_for(self.ids[i], rnd, self.params, weights)),
                    **_secure_records(rnd, None, wire.encode(request)),
                }),
                dst_node_id=self.nodes[i], message_type=TRAIN_SECURE, ttl=transport.timeout, group_id=str(rnd),
            )
            for i, request in requests.items()
        }
        return self._gather(opening, transport.timeout, "training", KeyAdvert)

    def share_keys(self, neighbourhoods: Mapping[int, Neighbourhood]) -> Replies[SharedKeys]:
        from fedtrain.secure.messages import SharedKeys

        return self._stage(SecureStage.SHARE_KEYS, neighbourhoods, SharedKeys)

    def masked_input(self, deliveries: Mapping[int, ShareDelivery]) -> Replies[MaskedInput]:
        from fedtrain.secure.messages import MaskedInput

        return self._stage(SecureStage.MASKED_INPUT, deliveries, MaskedInput)

    def unmask(self, requests: Mapping[int, UnmaskRequest]) -> Replies[UnmaskResponse]:
        from fedtrain.secure.messages import UnmaskResponse

        return self._stage(SecureStage.UNMASK, requests, UnmaskResponse)


class SecureFlowerTransport(FlowerTransport):
    """:class:`FlowerTransport` with SecAgg+: the coordinator drives
    :class:`~fedtrain.secure.protocol.SecureServer` over Flower messages
    (:class:`_FlowerChannel`) with the round driver a simulation uses,
    :func:`fedtrain.secure.round.run_secure_round`, so the engine gets the
    same single :class:`~fedtrain.types.AggregateUpdate` (origin
    ``SECURE_SUM``, ``client_id = "secure-aggregate"``): the survivors'
    weighted mean, ``num_examples`` their summed weight, ``contributors``
    their count, and a failure for each client left out.

    A round is four exchanges: ``train.secure`` (the task and the round's
    public setup; the client trains, keeps its update, answers with its key
    advert), then ``query.secure`` for sharing keys, the masked input and
    unmasking. The round's clients are those connected when it starts; one
    whose training fails is a dropout before it shared anything. A client
    that drops out is greeted again before the next round (it may have
    restarted). Distributed DP noise is drawn by each client
    (:class:`fedtrain.privacy.noise.SecureGaussian`, whatever
    ``privacy.secure_noise`` says: a deployment is not reproducible anyway).
    Under ``compression.up = 'randk'`` (read from the hello's config) the
    round's secure length is ``k``: the setup announces it, each worker
    checks it against its own config and masks its ``k`` kept values, and
    the coordinator scatters the unmasked mean back
    (:func:`~fedtrain.secure.round.run_secure_round`'s ``coordinates``).
    """

    def __init__(
        self, grid: Grid, hello: Hello, timeout: float, poll_seconds: float,
        settings: SecureSettings, weighted: bool, min_records: int = 1, copies: ClientCopies | None = None,
    ) -> None:
        from fedtrain.config import from_dict

        super().__init__(grid, hello, timeout, poll_seconds, min_records, copies)
        self.settings = settings
        self.weighted = weighted
        config = from_dict(hello.config)
        self.compression = config.compression
        self.seed = int(config.run.seed)

    def train_round(
        self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor
    ) -> RoundOutcome:
        from fedtrain.compression import secure_coordinates
        from fedtrain.secure.round import run_secure_round

        connected, failures = self.connected(clients, task)
        self.traffic = WireTraffic()
        self.model_bytes = 0
        ids = sorted(connected, key=lambda c: (len(c), c))
        nodes = {i: connected[cid] for i, cid in enumerate(ids)}
        secure = run_secure_round(
            _FlowerChannel(self, rnd, task, params, ids, nodes), self.settings, rnd=rnd, ids=ids,
            planned=len(clients), params=params, kind=task.kind,
            distributed_noise=task.privacy.distributed_noise, weighted=self.weighted,
            coordinates=secure_coordinates(
                self.compression.up, self.compression.fraction, self.seed, rnd, params.numel()
            ),
        )
        for index in secure.lost:
            self.lost_(ids[index], nodes[index])
        log.info("%s", self.traffic.describe(rnd))
        return secure.outcome(failures)

