"""Compression over a real deployment (issue 17): ``fedtrain server`` and
three ``fedtrain client`` processes over TLS with registered keys, int8 both
ways, on a wide MLP (so that TLS, HTTP/2, gRPC and Flower's framing are small
against the payloads). Each client encodes its update with its warm
error-feedback state and sends the int8 wire fields as raw bytes; the
coordinator sends each client the model whole in round 1 and as an int8 delta
against that client's copy in round 2. The clients reach the coordinator
through a counting TCP relay (:class:`CountingRelay`), so what crossed the
sockets, TLS records and all, is measured, and compared with what
``metrics.jsonl`` says crossed (``bytes_up`` / ``bytes_down``).

One module-scoped deployment serves the deployment tests; the others drive
the worker, the ClientApp relay and the transport in this process."""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtrain.compression import HEADER_BYTES, uncompressed_nbytes
from fedtrain.deploy.addresses import free_port

from deployed import Started, background_result, cli, in_background, rows

ROUNDS = 2
CLIENTS = 3
NUMEL = 64 * 128 + 128 + 128 * 10 + 10
"""The default MLP's parameters on digits."""
HIDDEN = 32768
"""The deployment's MLP width: 2.5M parameters, 9.8 MB as float32, 2.5 MB as int8."""
WIDE_NUMEL = 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
BLOCK = 256
CLIENT_POLL = 1.0
"""Seconds between a SuperNode's requests for messages: each request and its
answer cross the socket (a few hundred bytes over TLS), so the fewer, the
less of the socket's count is polling (Flower's own default is 3 s)."""


def int8_nbytes(numel: int) -> int:
    """One int8 payload: a code per value and a float32 scale per block."""
    return HEADER_BYTES + numel + 4 * -(-numel // BLOCK)


INT8_NBYTES = int8_nbytes(NUMEL)
WIRE_LINE = re.compile(
    r"round (\d+) wire: sent (\d+) payload bytes in (\d+) messages, received (\d+) payload bytes in (\d+) replies"
)


class CountingRelay:
    """A TCP relay on loopback port ``port`` between the clients and the
    coordinator's Fleet API (``upstream``) that counts every byte it passes
    each way: what the sockets carried (TLS records, HTTP framing, Flower's
    registration, heartbeats and polls, the hellos), nothing inferred from
    the messages. TLS runs end to end through it (it never decrypts). It
    listens once ``ready`` exists (the coordinator opens its Fleet address
    then), so a client that dials early is refused and retries, as it would
    be by the coordinator itself."""

    def __init__(self, upstream: tuple[str, int], port: int, ready: Path) -> None:
        self.upstream = upstream
        self.port = port
        self.ready = ready
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect_upstream(self) -> socket.socket | None:
        for _ in range(100):
            try:
                far = socket.create_connection(self.upstream, timeout=5)
                far.settimeout(None)
                return far
            except OSError:
                if self._stop.wait(0.1):
                    return None
        return None

    def _accept(self) -> None:
        while not self.ready.exists():
            if self._stop.wait(0.1):
                return
        self._listener = socket.create_server(("127.0.0.1", self.port))
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = self._connect_upstream()
            if far is None:
                near.close()
                continue
            self._open += [near, far]
            threading.Thread(target=self._pump, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for s in self._open:
            s.close()


@dataclass(frozen=True)
class Deployment:
    run_dir: Path
    rc: int
    logs: str
    server_log: str
    socket_up: int
    socket_down: int


@in_background("test_deploy_compression", 55)
def deploy(root: Path) -> Deployment:
    """The int8 deployment behind the socket-counting relay, started in the
    background as the session begins (:func:`deployed.in_background`)."""
    from fedtrain.certs import create_certificates

    certs = create_certificates(root / "certs", ["127.0.0.1", "localhost"], CLIENTS)
    port = free_port()
    run_dir = root / "run"
    relay = CountingRelay(("127.0.0.1", port), free_port(), run_dir / "flower" / "fleet-open")
    sets = [
        "--set", f"run.rounds={ROUNDS}", "--set", f"data.num_clients={CLIENTS}",
        "--set", f"strategy.clients_per_round={CLIENTS}", "--set", "client.timeout=60",
        "--set", f"model.hidden={HIDDEN}", "--set", "client.batch_size=512",
        "--set", "compression.up=int8", "--set", "compression.down=int8",
    ]
    try:
        with Started(root) as started:
            server = started.start("server", cli(
                "server", "--certs", str(certs.root), "--address", f"127.0.0.1:{port}", "--out", str(run_dir),
                "--quiet", "--wait", "120", *sets,
            ))
            for i in range(CLIENTS):
                started.start(f"client-{i}", cli(
                    "client", "--server", f"127.0.0.1:{relay.port}", "--certs", str(certs.root),
                    "--key", str(certs.root / f"client-{i + 1}"), "--partition", str(i), "--connect-timeout", "120",
                    "--poll", str(CLIENT_POLL),
                ))
            rc = server.wait(480)
        logs, server_log = started.all_logs(), started.log("server")
    finally:
        relay.close()
    return Deployment(run_dir, rc, logs, server_log, relay.up, relay.down)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return background_result("test_deploy_compression", tmp_path_factory.mktemp)


def test_int8_crosses_a_tls_deployment_both_ways(deployment: Deployment) -> None:
    metrics = rows(deployment.run_dir)
    assert deployment.rc == 0, deployment.logs
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1)), deployment.logs
    assert all(r["num_clients"] == CLIENTS and r["num_failed"] == 0 for r in metrics), metrics
    assert json.loads((deployment.run_dir / "summary.json").read_text())["rounds"] == ROUNDS
    wire = {int(m[0]): tuple(int(v) for v in m[1:]) for m in WIRE_LINE.findall(deployment.server_log)}
    assert sorted(wire) == [r["round"] for r in metrics], deployment.server_log[-3000:]
    for row in metrics:
        assert row["bytes_up"] == CLIENTS * int8_nbytes(WIDE_NUMEL), row
        assert CLIENTS * uncompressed_nbytes(WIDE_NUMEL) / row["bytes_up"] > 3.9, row
        sent, _, received, _ = wire[row["round"]]
        assert abs(received - row["bytes_up"]) <= 0.05 * row["bytes_up"], (row["round"], received, row["bytes_up"])
        assert abs(sent - row["bytes_down"]) <= 0.05 * row["bytes_down"], (row["round"], sent, row["bytes_down"])
    first, second = metrics
    assert first["bytes_down"] == CLIENTS * uncompressed_nbytes(WIDE_NUMEL), first
    assert second["bytes_down"] == CLIENTS * int8_nbytes(WIDE_NUMEL), second


def test_bytes_measured_on_the_socket_agree_with_the_record(deployment: Deployment) -> None:
    """Everything that crossed between the clients and the coordinator (the
    hellos, Flower's own traffic and TLS included) is within 5 % of what
    ``metrics.jsonl`` and the summary say crossed, each way."""
    assert deployment.rc == 0, deployment.logs
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    metrics = rows(deployment.run_dir)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in metrics)
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in metrics)
    up, down = deployment.socket_up, deployment.socket_down
    assert abs(up - summary["bytes_up"]) <= 0.05 * summary["bytes_up"], (up, summary["bytes_up"])
    assert abs(down - summary["bytes_down"]) <= 0.05 * summary["bytes_down"], (down, summary["bytes_down"])
    assert up >= summary["bytes_up"] and down >= summary["bytes_down"], "framing only adds bytes"


def test_a_workers_error_feedback_lives_across_rounds_and_its_reply_parses(tmp_path: Path) -> None:
    """The warm worker keeps its residual between rounds: with topk and error
    feedback, round 2 sends what round 1 left out plus the new update; the
    reply the relay builds parses on the coordinator to the payload sent."""
    import numpy as np
    import torch

    from fedtrain import RoundPlan
    from fedtrain.compression import Compressed, decode
    from fedtrain.config import Compression, load, to_dict
    from fedtrain.deploy.worker import ClientWorker
    from fedtrain.privacy.policy import ClientPrivacy
    from fedtrain.run import client_data
    from fedtrain.training.train_task import TrainTask
    from fedtrain.transport import flower
    from fedtrain.transport.flower_client_app import _train_records
    from fedtrain.transport.relay import Hello

    config = load(None, ["data.num_clients=3", "strategy.clients_per_round=3", "compression.up=topk",
                         "compression.fraction=0.05"])
    data = client_data(config, torch.device("cpu"))
    worker = ClientWorker("0", "0", None, "cpu")
    worker.hello(Hello(to_dict(config), data.input_shape, data.num_classes))
    trainer = worker._setup[1]  # type: ignore[index]
    params = trainer.layout.flatten(trainer.model.state_dict()).numpy()
    task = json.dumps(TrainTask.of(config.client, RoundPlan(clients=("0",)), ClientPrivacy()).as_json())

    first = worker.train(1, task, params)
    assert first.update.size == 0 and first.compressed is not None
    store = worker._uplink.store  # type: ignore[union-attr]
    assert store is not None and len(store) == 1
    residual = store.get("0").clone()  # type: ignore[union-attr]
    assert float(residual.abs().max()) > 0

    payload, count, _ = flower.parse_train_reply(_train_records(first), params.size)
    assert isinstance(payload, Compressed) and payload.method is Compression.TOPK
    assert count == first.num_examples and payload.nbytes < uncompressed_nbytes(params.size) / 9
    sent = decode(payload, params.size)
    assert int((sent != 0).sum()) == round(0.05 * params.size)

    second = worker.train(2, task, params)
    assert second.compressed is not None
    assert not torch.equal(store.get("0"), residual)  # type: ignore[arg-type]
    assert np.isfinite(decode(flower.parse_train_reply(_train_records(second), params.size)[0],  # type: ignore[arg-type]
                              params.size).numpy()).all()


def _downlink_setup(*overrides: str):  # type: ignore[no-untyped-def]
    import torch

    from fedtrain import RoundPlan
    from fedtrain.compression import ClientCopies
    from fedtrain.config import load, to_dict
    from fedtrain.deploy.worker import ClientWorker
    from fedtrain.privacy.policy import ClientPrivacy
    from fedtrain.run import client_data
    from fedtrain.training.train_task import TrainTask
    from fedtrain.transport.flower import FlowerTransport
    from fedtrain.transport.relay import Hello

    config = load(None, ["data.num_clients=3", "strategy.clients_per_round=3", "compression.down=int8", *overrides])
    data = client_data(config, torch.device("cpu"))
    hello = Hello(to_dict(config), data.input_shape, data.num_classes)
    worker = ClientWorker("0", "0", None, "cpu")
    worker.hello(hello)
    copies = ClientCopies.of(config.compression, config.run.seed)
    assert copies is not None
    transport = FlowerTransport(None, hello, 10.0, 0.1, 1, copies)  # type: ignore[arg-type]
    trainer = worker._setup[1]  # type: ignore[index]
    params = trainer.layout.flatten(trainer.model.state_dict())
    task = TrainTask.of(config.client, RoundPlan(clients=("0",)), ClientPrivacy())
    return config, worker, copies, transport, params, task, hello


def _sent(transport, rnd: int, params, task):  # type: ignore[no-untyped-def]
    """The training message for client 0 as the relay hands it to the worker."""
    from fedtrain.transport.flower_client_app import _model

    content = transport.train_content(rnd, task, transport.model_for("0", rnd, params, None))
    return content, _model(content)


def test_the_downlink_sends_a_delta_that_both_ends_decode_to_the_same_bits() -> None:
    """Round 1 sends the whole model; round 2 an int8 delta against the copy
    the client holds (a quarter of the bytes), which the worker and the
    coordinator decode to the same bits; a worker that restarted refuses a
    delta against a copy it does not hold, and after the coordinator forgets
    the copy (a failed round) it gets the whole model again."""
    import torch

    from fedtrain.deploy.worker import ClientWorker
    from fedtrain.transport.flower import record_bytes
    from fedtrain.transport.relay import DownlinkModel

    _, worker, copies, transport, params, task, hello = _downlink_setup()
    numel = params.numel()
    content, model = _sent(transport, 1, params, task)
    assert isinstance(model, DownlinkModel) and model.full is not None and model.delta is None
    assert transport.model_bytes == uncompressed_nbytes(numel)
    first = worker.global_model_(model)
    assert torch.equal(torch.from_numpy(first), params)

    moved = params + 0.01 * torch.randn(numel, generator=torch.Generator().manual_seed(3))
    transport.model_bytes = 0
    content, model = _sent(transport, 2, moved, task)
    assert isinstance(model, DownlinkModel) and model.delta is not None and model.base
    assert transport.model_bytes == INT8_NBYTES and record_bytes(content) < uncompressed_nbytes(numel) / 3.5
    second = torch.from_numpy(worker.global_model_(model))
    assert torch.equal(second, copies.store.get("0"))  # type: ignore[arg-type]
    assert not torch.equal(second, moved) and float((second - moved).abs().max()) < 1e-3

    restarted = ClientWorker("0", "0", None, "cpu")
    restarted.hello(hello)
    _, model = _sent(transport, 3, moved, task)
    assert isinstance(model, DownlinkModel) and model.delta is not None
    try:
        restarted.global_model_(model)
        raise AssertionError("a delta against a copy the worker does not hold was applied")
    except ValueError as exc:
        assert "no copy" in str(exc) and "whole model" in str(exc)
    copies.forget_("0")
    _, model = _sent(transport, 4, moved, task)
    assert isinstance(model, DownlinkModel) and model.full is not None
    assert torch.equal(torch.from_numpy(restarted.global_model_(model)), moved)


def test_a_tampered_delta_is_refused_by_its_digest() -> None:
    import dataclasses


    from fedtrain.transport.relay import DownlinkModel

    _, worker, _, transport, params, task, _ = _downlink_setup()
    worker.global_model_(_sent(transport, 1, params, task)[1])
    _, model = _sent(transport, 2, params + 0.02, task)
    assert isinstance(model, DownlinkModel) and model.delta is not None
    values = bytearray(model.delta["values"])  # type: ignore[arg-type]
    values[0] = (values[0] + 1) % 127
    forged = dataclasses.replace(model, delta={**model.delta, "values": bytes(values)})
    try:
        worker.global_model_(forged)
        raise AssertionError("a delta whose result differs from the coordinator's copy was applied")
    except ValueError as exc:
        assert "digest" in str(exc)
    assert worker._copy is None


def test_secure_aggregation_carries_randk_and_the_compressed_downlink(tmp_path: Path) -> None:
    """The deployed SecAgg+ path (SecureFlowerTransport driving real workers
    through the ClientApp handlers, as in tests/test_secure_flower.py) with
    compression.up = randk, as in a simulation: each client masks the k
    values it kept, so the sum has values on the round's shared coordinates
    only, equals the mean of what the clients sent, and what came back over
    Flower is a fraction of one dense masked vector per client; the model
    goes down whole in round 1 and as an int8 delta in round 2."""
    import numpy as np
    import torch

    from fedtrain.compression import (
        ClientCopies, CompactSecureAggregate, decode, from_wire, kept, randk_indices, randk_seed, wire_nbytes,
    )
    from fedtrain.config import load, to_dict
    from fedtrain.layout import ParamLayout
    from fedtrain.privacy.policy import ClientPrivacy
    from fedtrain.run import client_data, prepare_model
    from fedtrain.secure.setting import SecureSettings
    from fedtrain.training.train_task import TrainTask
    from fedtrain.transport import flower
    from fedtrain.transport.relay import Hello
    from fedtrain.types import AggregateUpdate, RoundPlan, UpdateKind
    from flwr.supercore.task_identity import TaskIdentity
    from test_secure_flower import LoopbackGrid, RecordingWorker, _client_app

    n, fraction = 3, 0.1
    config = load(None, [f"data.num_clients={n}", f"strategy.clients_per_round={n}", "secure.aggregation=true",
                         "compression.up=randk", f"compression.fraction={fraction}", "compression.down=int8"])
    data = client_data(config, torch.device("cpu"))
    model, _ = prepare_model(config, data.input_shape, data.num_classes, data.x_test[:2])
    params = ParamLayout.of(model.state_dict()).flatten(model.state_dict())
    numel = params.numel()
    workers = [RecordingWorker(str(i)) for i in range(n)]
    apps = [_client_app(w, tmp_path / f"client-{i}", 100 + i) for i, w in enumerate(workers)]
    settings = SecureSettings.of(config)
    backend = flower.SecureFlowerTransport(
        LoopbackGrid({100 + i: handle for i, (handle, _) in enumerate(apps)}),  # type: ignore[arg-type]
        Hello(to_dict(config), data.input_shape, data.num_classes), timeout=10.0, poll_seconds=0.01,
        settings=settings, weighted=True, copies=ClientCopies.of(config.compression, config.run.seed),
    )
    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        names = backend.wait_for_clients(n, 2, 10.0)
        task = TrainTask.of(config.client, RoundPlan(tuple(names), kind=UpdateKind.DELTA), ClientPrivacy())
        model_bytes = []
        for rnd in (1, 2):
            outcome = backend.train_round(rnd, names, task, params)
            model_bytes.append(backend.model_bytes)
            assert outcome.failures == (), outcome.failures
            (aggregate,) = outcome.updates
            assert isinstance(aggregate, AggregateUpdate) and aggregate.contributors == n
            sent = [decode(from_wire(w.updates[rnd].compressed, numel), numel).double()  # type: ignore[arg-type]
                    for w in workers]
            weights = [min(w.updates[rnd].num_examples, settings.max_weight) for w in workers]
            expected = sum(v * k for v, k in zip(sent, weights)) / sum(weights)
            np.testing.assert_allclose(aggregate.vector.numpy(), expected.numpy(), atol=1e-5)
            shared = set(randk_indices(randk_seed(config.run.seed, rnd), numel, kept(numel, fraction)).tolist())
            assert 0 < int((aggregate.vector != 0).sum()) <= len(shared)
            assert set(torch.nonzero(aggregate.vector).flatten().tolist()) <= shared
            assert isinstance(aggregate, CompactSecureAggregate)
            assert wire_nbytes(aggregate, numel) == n * (len(shared) + 1) * 4
            assert backend.traffic.received_bytes < n * 4 * numel / 5, "dense masked inputs would exceed n · 4P"
            params = params + aggregate.vector
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
        for _, server in apps:
            server.close()
    assert model_bytes[0] == n * uncompressed_nbytes(numel)
    assert model_bytes[1] == n * INT8_NBYTES
