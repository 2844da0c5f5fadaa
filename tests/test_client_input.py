"""Every value a client supplies is checked where it enters: a bad one leaves
that client out (of the run or of the round) with a reason, never ends the run.

Flower replies are parsed from crafted records (no processes); the engine's
own check (:func:`fedtrain.validation.rejection_reason`) covers simulations.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtrain import ParamLayout, load_strategy
from fedtrain.transport import flower
from fedtrain.training.train_task import TrainTask
from fedtrain.config import ClientConfig, load, to_dict
from fedtrain.engine import Engine, RngStreams
from fedtrain.types import RoundOutcome
from fedtrain.models import mlp
from fedtrain.privacy.policy import ClientPrivacy
from fedtrain.transport.relay import RAW_STYPE, ClientInfo, Hello
from fedtrain.sampling import UniformSampler
from fedtrain.types import MAX_RECORDS, ClientUpdate, Evaluation, RoundPlan, UpdateKind
from fedtrain.validation import metrics_reason, rejection_reason

NUMEL = 5


def _hello(**fields: object) -> RecordDict:
    row: dict[str, object] = {"status": "ok", "name": "7", "num_records": 120, "device": "cpu", "fingerprint": "0" * 64}
    row.update(fields)
    return RecordDict({"result": ConfigRecord({k: v for k, v in row.items() if v is not MISSING})})


MISSING = object()


@pytest.mark.parametrize(("fields", "named"), [
    ({"num_records": "abc"}, "num_records = 'abc'"),
    ({"num_records": math.nan}, "num_records = nan"),
    ({"num_records": 12.0}, "num_records = 12.0"),
    ({"num_records": True}, "num_records = True"),
    ({"num_records": MISSING}, "result: missing ['num_records']"),
    ({"num_records": -5}, "num_records = -5"),
    ({"num_records": 0}, "num_records = 0"),
    ({"num_records": 10**18}, "num_records = 1000000000000000000"),
    ({"name": ""}, "name = ''"),
    ({"name": "a\nb"}, "name = 'a\\nb'"),
    ({"name": "x" * 500}, "name = 'xxx"),
    ({"name": 7}, "name = 7"),
    ({"name": MISSING}, "result: missing ['name']"),
    ({"device": MISSING}, "result: missing ['device']"),
    ({"device": "d" * 100}, "device = 'ddd"),
    ({"extra": 1}, "result: unknown key 'extra'"),
    ({"status": "maybe"}, "status = 'maybe'"),
    ({"status": MISSING}, "status = None"),
])
def test_a_hello_with_a_bad_field_is_rejected_naming_it(fields: dict[str, object], named: str) -> None:
    with pytest.raises(flower.RejectedReply) as caught:
        flower.parse_hello_reply(_hello(**fields))
    assert named in str(caught.value)
    assert len(str(caught.value)) < 400


def test_a_well_formed_hello_gives_the_client_info() -> None:
    assert flower.parse_hello_reply(_hello()) == ClientInfo("7", 120, "cpu", "0" * 64)
    assert flower.parse_hello_reply(_hello(num_records=MAX_RECORDS)).num_records == MAX_RECORDS


def test_a_hello_below_min_records_is_rejected_naming_the_setting() -> None:
    with pytest.raises(flower.RejectedReply, match=r"num_records = 3: below privacy.min_records = 16"):
        flower.parse_hello_reply(_hello(num_records=3), min_records=16)
    assert flower.parse_hello_reply(_hello(num_records=16), min_records=16).num_records == 16


def test_a_clients_own_error_text_is_cut_and_escaped() -> None:
    reply = RecordDict({"result": ConfigRecord({"status": "error", "reason": "\x1b[31m" + "x" * 5000})})
    with pytest.raises(flower.RejectedReply) as caught:
        flower.parse_hello_reply(reply)
    text = str(caught.value)
    assert text.startswith("client error: ") and "\x1b" not in text and len(text) < 400


def test_a_hello_with_records_of_the_wrong_kind_is_rejected() -> None:
    array = RecordDict({"result": ArrayRecord({"a": Array(np.zeros(2, np.float32))})})
    with pytest.raises(flower.RejectedReply, match="'result' config record"):
        flower.parse_hello_reply(array)
    with pytest.raises(flower.RejectedReply, match="records"):
        flower.parse_hello_reply(RecordDict({**_hello(), "more": ConfigRecord({"x": 1})}))


def _float64() -> Array:
    return Array(dtype="float64", shape=(NUMEL,), stype=RAW_STYPE, data=np.zeros(NUMEL, "<f8").tobytes())


def _train(vector: Array | None = None, **fields: object) -> RecordDict:
    row: dict[str, object] = {"status": "ok", "num_examples": 120, "metrics": json.dumps({"train_loss": 0.5})}
    row.update(fields)
    update = vector if vector is not None else flower.float32_array(np.arange(NUMEL, dtype=np.float32))
    return RecordDict({
        "update": ArrayRecord({"update": update}),
        "result": ConfigRecord({k: v for k, v in row.items() if v is not MISSING}),
    })


def test_a_well_formed_training_reply_parses() -> None:
    vector, count, metrics = flower.parse_train_reply(_train(), NUMEL)

    assert vector.dtype == np.float32 and vector.tolist() == list(range(NUMEL))
    assert (count, metrics) == (120, {"train_loss": 0.5})


@pytest.mark.parametrize(("content", "named"), [
    (_train(num_examples="abc"), "num_examples = 'abc'"),
    (_train(num_examples=math.nan), "num_examples = nan"),
    (_train(num_examples=0), "num_examples = 0"),
    (_train(num_examples=10**18), "num_examples = 1000000000000000000"),
    (_train(num_examples=True), "num_examples = True"),
    (_train(num_examples=MISSING), "result: missing ['num_examples']"),
    (_train(metrics='{"train_loss": NaN}'), "metric train_loss = nan"),
    (_train(metrics='{"train_loss": Infinity}'), "metric train_loss = inf"),
    (_train(metrics='{"train_loss": 1e400}'), "metric train_loss = inf"),
    (_train(metrics='{"train_loss": "low"}'), "metric train_loss = 'low'"),
    (_train(metrics='{"train_loss": 1}'), "metric train_loss = 1"),
    (_train(metrics='{"train_loss": [1.0]}'), "metric train_loss = a list"),
    (_train(metrics='{"unclipped": 0.5}'), "metric unclipped = 0.5"),
    (_train(metrics='{"accuracy": 0.9}'), "metric 'accuracy': unknown"),
    (_train(metrics="[" * 500 + "]" * 500), "metrics = a list"),
    (_train(metrics="{\"train_loss\": " + "[" * 450 + "]" * 450 + "}"), "metric train_loss = a list"),
    (_train(metrics='{"a": "' + "x" * 10**6 + '"}'), "metrics = 1000009 characters"),
    (_train(metrics="not json"), "not JSON"),
    (_train(metrics=3), "metrics = a int"),
    (_train(_float64()), "float64"),
    (_train(flower.float32_array(np.zeros(NUMEL + 1, np.float32))), f"shape ({NUMEL + 1},)"),
    (_train(Array(dtype="float32", shape=(1, NUMEL), stype=RAW_STYPE, data=bytes(4 * NUMEL))), f"shape (1, {NUMEL})"),
    (_train(Array(dtype="float32", shape=(NUMEL,), stype=RAW_STYPE, data=b"\x80\x04junk")), "update"),
    (_train(Array(dtype="float32", shape=(NUMEL,), stype=RAW_STYPE, data=b"0" * 10**6)), "bytes"),
    (_train(Array(dtype="float32", shape=(NUMEL,), stype="torch.Tensor", data=b"")), "torch.Tensor"),
    (_train(Array(dtype="float32", shape=(NUMEL,), stype=RAW_STYPE,
                  data=Array(np.zeros(NUMEL, ">f4")).data)), "do not hold"),
    (_train(Array(dtype="float32", shape=(NUMEL,), stype=RAW_STYPE,
                  data=np.zeros(2, np.float32).tobytes())), "do not hold"),
    (_train(Array(np.arange(NUMEL, dtype=np.float32))), "stype = 'numpy.ndarray'"),
    (_train(Array(dtype="float32", shape=(-NUMEL,), stype=RAW_STYPE, data=b"")), f"shape (-{NUMEL},)"),
    (_train(Array(dtype=">f4", shape=(NUMEL,), stype=RAW_STYPE, data=np.zeros(NUMEL, ">f4").tobytes())),
     "dtype = '>f4'"),
])
def test_a_bad_training_reply_is_rejected_naming_the_field(content: RecordDict, named: str) -> None:
    with pytest.raises(flower.RejectedReply) as caught:
        flower.parse_train_reply(content, NUMEL)
    assert named in str(caught.value)
    assert len(str(caught.value)) < 400


def test_an_object_array_is_never_unpickled() -> None:
    for stype in ("numpy.ndarray", RAW_STYPE):
        payload = Array(dtype="float32", shape=(NUMEL,), stype=stype, data=_npy_of_objects())
        with pytest.raises(flower.RejectedReply, match="update"):
            flower.parse_train_reply(_train(payload), NUMEL)


def _npy_of_objects() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([object()] * NUMEL, dtype=object), allow_pickle=True)
    return buffer.getvalue()


# ------------------------------------------------- compressed training replies


def _int8_fields(numel: int = NUMEL) -> dict[str, bytes | int]:
    from fedtrain.compression import EncodeState, encode, to_wire
    from fedtrain.config import Compression

    vector = torch.linspace(-1.0, 1.0, numel)
    return to_wire(encode(vector, Compression.INT8, EncodeState(torch.Generator().manual_seed(3), block=256)))


def _compressed(fields: Mapping[str, object] | None = None, **result: object) -> RecordDict:
    """A compressed training reply as fedtrain's relay builds it, with
    ``fields`` over the wire fields and ``result`` over the result record."""
    from fedtrain.transport.flower_client_app import _train_records
    from fedtrain.transport.relay import TrainReply

    wire = {**_int8_fields(), **(fields or {})}
    content = _train_records(TrainReply(np.empty(0, np.float32), 120, {"train_loss": 0.5}, wire))  # type: ignore[arg-type]
    row = {**dict(content["result"]), **result}
    return RecordDict({
        "compressed": content["compressed"],
        "result": ConfigRecord({k: v for k, v in row.items() if v is not MISSING}),
    })


def test_a_compressed_training_reply_from_the_relay_parses_to_its_payload() -> None:
    from fedtrain.compression import Compressed, decode
    from fedtrain.config import Compression

    payload, count, metrics = flower.parse_train_reply(_compressed(), NUMEL)

    assert isinstance(payload, Compressed) and payload.method is Compression.INT8
    assert (count, metrics) == (120, {"train_loss": 0.5})
    assert flower.record_bytes(_compressed()) >= payload.nbytes - 45
    back = decode(payload, NUMEL)
    assert torch.allclose(back, torch.linspace(-1.0, 1.0, NUMEL), atol=1.0 / 127 + 1e-6)


def _with_update(content: RecordDict) -> RecordDict:
    return RecordDict({**content, "update": ArrayRecord({"update": flower.float32_array(np.zeros(NUMEL, np.float32))})})


def _uint8(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=RAW_STYPE, data=data)


def _compressed_record(**arrays: Array) -> RecordDict:
    content = _compressed()
    return RecordDict({"compressed": ArrayRecord(arrays), "result": content["result"]})


@pytest.mark.parametrize(("content", "named"), [
    (_compressed(method=99), "compressed field 'method' = 99"),
    (_compressed(method=True), "compressed field 'method' = True"),
    (_compressed(method=-1), "compressed field 'method' = -1"),
    (_compressed(numel=NUMEL + 1), f"compressed vector of {NUMEL + 1} values, the model has {NUMEL}"),
    (_compressed(seed=MISSING), "result: missing ['seed']"),
    (_compressed(block=0), "block = 0"),
    (_compressed({"values": bytes(NUMEL + 3)}), f"{NUMEL + 3} values for a int8 vector of {NUMEL}"),
    (_compressed({"values": bytes(NUMEL - 1)}), f"{NUMEL - 1} values for a int8 vector of {NUMEL}"),
    (_compressed({"scales": bytes(3)}), "3 scale bytes, expected 4"),
    (_compressed({"indices": bytes(8)}), "8 index bytes, expected 0"),
    (_compressed({"values": b"\x80" * NUMEL}), "a int8 code outside ±127"),
    (_compressed({"method": 4, "values": bytes(NUMEL)}), "values for a int4 vector"),
    (_compressed(extra=1), "result: unknown key 'extra'"),
    (_with_update(_compressed()), "exactly one of them"),
    (RecordDict({"result": _compressed()["result"]}), "exactly one of 'update' (float32) and 'compressed'"),
    (RecordDict({"result": _train()["result"]}), "exactly one of 'update' (float32) and 'compressed'"),
    (_train(method=2), "result: unknown key 'method'"),
    (_compressed_record(values=_uint8(bytes(NUMEL)), scales=_uint8(bytes(4))), "expected an array record of exactly"),
    (_compressed_record(values=flower.float32_array(np.zeros(NUMEL, np.float32)), scales=_uint8(bytes(4)),
                        indices=_uint8(b"")), "compressed values: dtype = 'float32'"),
    (_compressed_record(values=Array(dtype="uint8", shape=(NUMEL * 1000,), stype=RAW_STYPE, data=bytes(NUMEL)),
                        scales=_uint8(bytes(4)), indices=_uint8(b"")), "do not hold"),
])
def test_a_bad_compressed_reply_is_rejected_naming_the_field(content: RecordDict, named: str) -> None:
    with pytest.raises(flower.RejectedReply) as caught:
        flower.parse_train_reply(content, NUMEL)
    assert named in str(caught.value)
    assert len(str(caught.value)) < 400


def test_a_compressed_reply_reports_a_clients_own_error() -> None:
    error = RecordDict({"result": ConfigRecord({"status": "error", "reason": "out of memory"}),
                        "compressed": _compressed()["compressed"]})
    with pytest.raises(flower.ClientReportedError, match="client error: out of memory"):
        flower.parse_train_reply(error, NUMEL)


# --------------------------------------------------------------- the backend


@pytest.fixture()
def run_identity() -> Iterator[None]:
    """Flower's messages need a run id; set one for the test, as a ServerApp would have."""
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


Reply = Callable[[Message], RecordDict]


class CannedGrid:
    """Stands in for Flower's ``Grid``: every node answers each message with
    the content its function gives (a crafted client, not fedtrain's relay)."""

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
        for message_id in list(message_ids):
            message = self.pending.pop(message_id, None)
            if message is not None:
                out.append(Message(self.replies[message.metadata.dst_node_id](message), reply_to=message))
        return out


def _backend(replies: Mapping[int, Reply], min_records: int = 1) -> flower.FlowerTransport:
    config = load(None, ["data.num_clients=4", "strategy.clients_per_round=4"])
    hello = Hello(to_dict(config), (NUMEL,), 2)
    return flower.FlowerTransport(CannedGrid(replies), hello, timeout=5.0, poll_seconds=0.0,  # type: ignore[arg-type]
                                min_records=min_records)


def _client(name: str, records: object, train: Callable[[], RecordDict] | None = None) -> Reply:
    def reply(message: Message) -> RecordDict:
        if message.metadata.message_type == "query":
            return _hello(name=name, num_records=records)
        return train() if train is not None else _train(num_examples=records)

    return reply


def test_discover_leaves_malformed_hellos_out_and_the_run_goes_on(
    run_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _backend({
        1: _client("good", 120),
        2: _client("text", "abc"),
        3: _client("nan", math.nan),
        4: _client("huge", 10**18),
        5: _client("negative", -3),
        6: lambda m: RecordDict({"result": ConfigRecord({"status": "ok"})}),
        7: _client("small", 3),
    }, min_records=16)

    names = backend.wait_for_clients(expected=7, minimum=1, wait=0.0)

    assert names == ["good"]
    left_out = " ".join(r.getMessage() for r in caplog.records if "left out" in r.getMessage())
    for why in ("num_records = 'abc'", "num_records = nan", "num_records = 1000000000000000000",
                "num_records = -3", "result: missing", "num_records = 3: below privacy.min_records = 16"):
        assert why in left_out


def test_a_client_rejoining_with_another_count_is_left_out(run_identity: None) -> None:
    backend = _backend({1: _client("a", 120)})
    backend.discover()
    backend.grid.replies[2] = _client("a", 10**6)  # type: ignore[attr-defined]
    del backend.grid.replies[1]  # type: ignore[attr-defined]

    reason = backend.admit(2, Message(_hello(name="a", num_records=10**6), reply_to=_query(2)))

    assert reason is not None and "joined with 120 records" in reason
    assert backend.clients["a"].num_records == 120


def _query(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="query")


def test_a_malformed_training_reply_fails_that_client_and_the_round_goes_on(run_identity: None) -> None:
    backend = _backend({
        1: _client("good", 120),
        2: _client("nan_loss", 120, lambda: _train(metrics='{"train_loss": NaN}')),
        3: _client("overflow", 120, lambda: _train(num_examples=10**18)),
        4: _client("liar", 120, lambda: _train(num_examples=7)),
        5: _client("float64", 120, lambda: _train(_float64())),
        6: _client("error", 120, lambda: RecordDict({"result": ConfigRecord({"status": "error", "reason": "no"})})),
    })
    names = backend.wait_for_clients(expected=6, minimum=1, wait=0.0)
    task = TrainTask.of(ClientConfig(), RoundPlan(tuple(names)), ClientPrivacy())

    outcome = backend.train_round(1, names, task, torch.zeros(NUMEL))

    assert [u.client_id for u in outcome.updates] == ["good"]
    reasons = {f.client_id: f.reason for f in outcome.failures}
    assert "metric train_loss = nan" in reasons["nan_loss"]
    assert "num_examples = 1000000000000000000" in reasons["overflow"]
    assert "declared 7 examples, but joined with 120 records" in reasons["liar"]
    assert "float64" in reasons["float64"]
    assert reasons["error"] == "client error: no"


def test_a_compressed_reply_reaches_the_engine_as_its_payload_and_a_bad_one_fails(run_identity: None) -> None:
    from fedtrain.compression import CompressedUpdate

    backend = _backend({
        1: _client("int8", 120, _compressed),
        2: _client("short", 120, lambda: _compressed({"values": bytes(2)})),
        3: _client("both", 120, lambda: _with_update(_compressed())),
    })
    names = backend.wait_for_clients(expected=3, minimum=1, wait=0.0)
    task = TrainTask.of(ClientConfig(), RoundPlan(tuple(names)), ClientPrivacy())

    outcome = backend.train_round(1, names, task, torch.zeros(NUMEL))

    [update] = outcome.updates
    assert isinstance(update, CompressedUpdate) and update.client_id == "int8" and update.vector.numel() == 0
    assert update.num_examples == 120 and update.payload.numel == NUMEL
    reasons = {f.client_id: f.reason for f in outcome.failures}
    assert "2 values for a int8 vector" in reasons["short"]
    assert "exactly one of them" in reasons["both"]


# ------------------------------------------------------ the engine's checks


def _update(num_examples: object = 10, metrics: object = None, contributors: int = 1) -> ClientUpdate:
    return ClientUpdate("c", torch.zeros(NUMEL), num_examples, UpdateKind.DELTA,  # type: ignore[arg-type]
                        {} if metrics is None else metrics, contributors)  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_examples", "named"), [
    (10**400, "num_examples = an integer of 1329 bits"),
    (MAX_RECORDS + 1, "num_examples = 1000000001: must be in 1 … 1000000000"),
    (0, "num_examples = 0"),
    (-1, "num_examples = -1"),
    (True, "num_examples = True"),
    (3.0, "num_examples = 3.0"),
    (math.inf, "num_examples = inf"),
    ("12", "num_examples = '12'"),
])
def test_update_counts_are_bounded_integers(num_examples: object, named: str) -> None:
    reason = rejection_reason(_update(num_examples), NUMEL, UpdateKind.DELTA)
    assert reason is not None and named in reason


def test_update_counts_within_bounds_pass_and_aggregates_may_sum_theirs() -> None:
    assert rejection_reason(_update(MAX_RECORDS), NUMEL, UpdateKind.DELTA) is None
    assert rejection_reason(_update(1), NUMEL, UpdateKind.DELTA) is None
    assert rejection_reason(_update(3 * MAX_RECORDS, contributors=3), NUMEL, UpdateKind.DELTA) is None
    assert rejection_reason(_update(10, contributors=0), NUMEL, UpdateKind.DELTA) is not None


@pytest.mark.parametrize(("metrics", "named"), [
    ({"train_loss": math.nan}, "metric train_loss = nan"),
    ({"train_loss": math.inf}, "metric train_loss = inf"),
    ({"train_loss": "0.1"}, "metric train_loss = '0.1'"),
    ({"train_loss": 1}, "metric train_loss = 1"),
    ({"train_loss": True}, "metric train_loss = True"),
    ({"train_loss": [[[[1.0]]]] * 1000}, "metric train_loss = a list"),
    ({"loss": 0.1}, "metric 'loss': unknown"),
    ({"unclipped": 2.0}, "metric unclipped = 2.0"),
    ({f"k{i}": 0.0 for i in range(10**5)}, "unknown"),
    ([("train_loss", 0.1)], "metrics = a list"),
])
def test_bad_metrics_refuse_the_update(metrics: object, named: str) -> None:
    reason = rejection_reason(_update(metrics=metrics), NUMEL, UpdateKind.DELTA)
    assert reason is not None and named in reason
    assert metrics_reason({"train_loss": 0.25, "unclipped": 1.0}) is None


class CraftedBackend:
    """A backend whose clients send the given updates (test input, not fedtrain's trainer)."""

    def __init__(self, updates: Sequence[ClientUpdate]) -> None:
        self.updates = tuple(updates)

    def train_round(self, rnd: int, clients: Sequence[str], task: TrainTask, params: torch.Tensor) -> RoundOutcome:
        return RoundOutcome(self.updates, ())


def test_the_engine_refuses_bad_counts_and_metrics_and_records_why() -> None:
    model = mlp((4,), 2, hidden=3)
    layout = ParamLayout.of(model.state_dict())
    params = layout.flatten(model.state_dict())
    good = torch.full((layout.numel,), 0.01)
    updates = [
        ClientUpdate("good", good, 10, metrics={"train_loss": 0.5}),
        ClientUpdate("overflow", good, 10**400, metrics={"train_loss": 0.5}),
        ClientUpdate("nan", good, 10, metrics={"train_loss": math.nan}),
        ClientUpdate("text", good, 10, metrics={"train_loss": "low"}),  # type: ignore[dict-item]
    ]
    engine = Engine(
        strategy=load_strategy("fedavg"),
        executor=CraftedBackend(updates),
        sampler=UniformSampler(4),
        evaluate=lambda p: Evaluation({"accuracy": 0.0, "loss": 0.0}, 1),
        clients=[u.client_id for u in updates],
        client=ClientConfig(),
        min_clients=1,
        rngs=RngStreams.from_seed(0),
    )

    new, record = engine.run_round(1, params)

    assert record.num_clients == 1 and record.train_loss == 0.5
    assert set(record.failures) == {"overflow", "nan", "text"}
    assert "num_examples" in record.failures["overflow"] and "nan" in record.failures["nan"]
    torch.testing.assert_close(new, params + good)
    assert json.loads(json.dumps(record.as_json(), allow_nan=False))["train_loss"] == 0.5
