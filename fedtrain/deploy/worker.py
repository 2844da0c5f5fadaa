"""The long-lived training process of a deployed client.

Flower's SuperNode starts a fresh ``ClientApp`` process for every message it
receives. Importing torch, loading the data and building the model in each of
those would cost seconds per round, so fedtrain's ``ClientApp`` is a thin relay
(:mod:`fedtrain.transport.flower_client_app`) that hands the message to this
worker, which ``fedtrain client`` runs in its own process
(:func:`fedtrain.deploy.client.join`), over a local socket authenticated with
a random key (``multiprocessing.connection``'s HMAC challenge). The worker
keeps the data, the model and its optimisers warm across rounds, and runs the
same :class:`~fedtrain.training.trainer.LocalTrainer` as the simulation.

Under ``compression.down`` the worker keeps its copy of the global model
(:meth:`ClientWorker.global_model_`): the coordinator sends a delta against
it, which both ends decode to the same bits.

Under secure aggregation the worker trains but keeps its update, and plays
its :class:`~fedtrain.secure.protocol.SecureClient` for the round: only the
masked vector ever leaves it. The stage messages arrive as bytes from the
network and are decoded by :mod:`fedtrain.secure.wire` (never unpickled).

The worker imports nothing from Flower.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

import numpy as np
import torch

from fedtrain.config import BUILTIN_DATASETS, BUILTIN_MODELS, BUILTIN_TASKS, Config, ConfigError, from_dict
from fedtrain.errors import DataError, MissingFileError, UsageError
from fedtrain.plugin import PluginError
from fedtrain.transport.relay import (
    AUTHKEY_BYTES,
    ClientInfo,
    DownlinkModel,
    Hello,
    RequestKind,
    SecureRequest,
    SecureStage,
    TrainReply,
)

if TYPE_CHECKING:
    from fedtrain.compression import Uplink
    from fedtrain.secure.protocol import SecureClient

log = logging.getLogger(__name__)

HELD_JOB = "a training job, held"
"""What a ``--delay`` client's log says when it takes a job (and holds it for the delay)."""


@dataclass
class HeldUpdate:
    """A secure round's state on the client: the clear update (until it is
    masked), the records it was trained on, and the round's protocol state
    machine. Mutable: the protocol advances it stage by stage."""

    update: np.ndarray | None
    num_examples: int
    client: SecureClient


def load_own_data(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's own records from an ``.npz`` file with arrays ``x`` (inputs,
    shaped like the model's) and ``y`` (targets): integer arrays become int64
    (labels, token ids), the others float32; the run's task checks the rest."""
    if not path.is_file():
        raise MissingFileError(f"--data {path}: no such file")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise DataError(f"--data {path}: needs arrays 'x' and 'y', found {sorted(f.files)}")
        x, y = f["x"], f["y"]
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"--data {path}: x has {len(x)} rows and y {len(y)}; need the same, at least one")
    return _as_tensor(x), _as_tensor(y)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.int64 if np.issubdtype(array.dtype, np.integer) else torch.float32)


class PluginRefused(PluginError):
    """The coordinator's config names code (a model or data set plug-in) that
    this client's command line does not allow: a client never imports code
    because a coordinator named it."""


def plugin_refusal(config: Config, own_data: bool, allowed: Collection[str]) -> str | None:
    """Why this client refuses to build ``config`` (a plug-in it was not
    allowed to import), or None. Only what the client would import counts:
    ``data.dataset`` is never loaded when the client trains on its own
    ``--data``. A plug-in is allowed by its exact name
    (``fedtrain client --allow-plugin NAME``)."""
    named = [("model.name", config.model.name, BUILTIN_MODELS), ("task.name", config.task.name, BUILTIN_TASKS)]
    if not own_data:
        named.append(("data.dataset", config.data.dataset, BUILTIN_DATASETS))
    for key, value, builtins in named:
        if value not in builtins and value not in allowed:
            return (
                f"{key} = {value!r} is a plug-in; this client imports only built-in ones "
                f"({', '.join(builtins)}) unless started with --allow-plugin NAME"
            )
    return None


class ClientWorker:
    """Answers :class:`Hello` and train requests for one client's data.

    The run's config comes from the coordinator: it is data, never a reason
    to import code. Built-in models and data sets only, plus the plug-ins
    named in ``allowed_plugins`` (the client's ``--allow-plugin``)."""

    def __init__(
        self, name: str, partition: str | None, data_path: Path | None, device: str,
        allowed_plugins: Collection[str] = (), delay_seconds: float = 0.0,
    ) -> None:
        if (partition is None) == (data_path is None):
            raise UsageError("give exactly one of --partition and --data")
        self.name = name
        self.partition = partition
        self.data_path = data_path
        self.device_name = device
        self.allowed_plugins = frozenset(allowed_plugins)
        self.delay_seconds = delay_seconds
        self._setup: tuple[Mapping[str, Any], Any, torch.Tensor, torch.Tensor, int] | None = None
        self._fingerprint = ""
        self._held: dict[int, HeldUpdate] = {}
        self._uplink: Uplink | None = None
        self._copy: torch.Tensor | None = None
        self._copy_digest = ""
        self.lock = threading.Lock()

    def _records(self, config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_path is not None:
            x, y = load_own_data(self.data_path)
            return x.to(device), y.to(device)
        from fedtrain.run import client_data

        data = client_data(config, device).data
        if self.partition not in data.ids:
            raise ConfigError(
                f"--partition {self.partition}: the run has data.num_clients = {config.data.num_clients} "
                f"partitions, numbered 0 to {config.data.num_clients - 1}"
            )
        return data.load(self.partition)

    def hello(self, hello: Hello) -> ClientInfo:
        """Load the data and build the model for the run described by ``hello``
        (once per config: a repeated hello of the same run costs nothing)."""
        from fedtrain.compression import CompressionPlan
        from fedtrain.run import build_trainable
        from fedtrain.training.trainer import resolve_device

        if self._setup is None or self._setup[0] != hello.config:
            config = from_dict(hello.config)
            refusal = plugin_refusal(config, self.data_path is not None, self.allowed_plugins)
            if refusal is not None:
                raise PluginRefused(f"client {self.name} refused the run: {refusal}")
            device = resolve_device(self.device_name if self.device_name != "config" else config.client.device)
            x, y = self._records(config, device)
            if tuple(x.shape[1:]) != hello.input_shape:
                raise ValueError(
                    f"client {self.name}: records are shaped {tuple(x.shape[1:])}, the run's model "
                    f"expects {hello.input_shape}"
                )
            trainable = build_trainable(config, hello.input_shape, hello.num_classes, (x, y), device)
            trainer = trainable.trainer
            self._setup = (hello.config, trainer, x, y, int(config.run.seed))
            self._fingerprint = trainable.fingerprint()
            plan = CompressionPlan.of(config.compression, int(config.run.seed))
            self._uplink = None if plan is None else plan.uplink
            self._copy, self._copy_digest = None, ""
            log.info("client %s: %d records on %s, model of %d parameters",
                     self.name, len(y), device, trainer.layout.numel)
        trainer, y = self._setup[1], self._setup[3]
        return ClientInfo(self.name, len(y), str(trainer.device), self._fingerprint)

    def global_model_(self, params: np.ndarray | DownlinkModel) -> np.ndarray:
        """The model to train from: ``params`` itself, or under
        ``compression.down`` this client's copy brought up to date by the
        coordinator's message (the whole model, or a delta applied to the
        copy it names), checked to be bit for bit the copy the coordinator
        holds (:func:`fedtrain.compression.copy_digest`). A delta against
        another copy (this worker restarted, or lost a round's model) is
        refused, and the coordinator, seeing the round fail, sends the whole
        model next time."""
        from fedtrain.compression import applied, copy_digest, from_wire

        if not isinstance(params, DownlinkModel):
            return params
        held, self._copy, digest = self._copy, None, self._copy_digest
        if params.delta is None:
            if params.full is None:
                raise ValueError(f"client {self.name}: a downlink message with neither a model nor a delta")
            copy = torch.from_numpy(np.array(params.full, dtype=np.float32))
        elif held is None or params.base != digest:
            raise ValueError(
                f"client {self.name}: a model delta against copy {params.base[:12]}…, but this client holds "
                f"{digest[:12] + '…' if held is not None else 'no copy'} (restarted, or missed a model); "
                "the coordinator sends the whole model next round"
            )
        else:
            copy = applied(held, from_wire(params.delta, held.numel()))
        if copy_digest(copy) != params.digest:
            raise ValueError(
                f"client {self.name}: the decoded model's digest differs from the coordinator's copy "
                f"({params.digest[:12]}…); the coordinator sends the whole model next round"
            )
        self._copy, self._copy_digest = copy, params.digest
        return copy.numpy().copy()

    def train(self, rnd: int, task_json: str, params: np.ndarray | DownlinkModel) -> TrainReply:
        """Train for round ``rnd`` from :meth:`global_model_`; under
        ``compression.up`` the trained (and clipped) update is encoded with
        this client's error-feedback residual, which stays in this warm
        process (:meth:`fedtrain.compression.Uplink.encode_`), and the reply
        carries the wire fields instead of the float32 update."""
        from fedtrain.compression import to_wire
        from fedtrain.training.train_task import TrainTask

        reply = self._train_plain(rnd, task_json, self.global_model_(params))
        if self._uplink is None:
            return reply
        task = TrainTask.from_json(json.loads(task_json))
        c = self._uplink.encode_(self.name, rnd, torch.from_numpy(reply.update), task.privacy.clip)
        return TrainReply(np.empty(0, dtype=np.float32), reply.num_examples, reply.metrics, to_wire(c))

    def _train_plain(self, rnd: int, task_json: str, params: np.ndarray) -> TrainReply:
        from fedtrain.training.train_task import TrainTask

        if self._setup is None:
            raise RuntimeError(f"client {self.name}: asked to train before the run's hello")
        _, trainer, x, y, seed = self._setup
        task = TrainTask.from_json(json.loads(task_json))
        if params.shape != (trainer.layout.numel,):
            raise ValueError(
                f"client {self.name}: global model has {params.shape} values, expected ({trainer.layout.numel},)"
            )
        started = time.perf_counter()
        global_params = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32)).to(trainer.device)
        out = torch.empty_like(global_params)
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        result = trainer.train(global_params, x, y, task, generator, out)
        log.info("round %d: client %s trained on %d records in %.2f s",
                 rnd, self.name, result.num_examples, time.perf_counter() - started)
        return TrainReply(out.cpu().numpy(), result.num_examples, dict(result.metrics))

    def train_secure(self, rnd: int, task_json: str, params: np.ndarray | DownlinkModel, opening: bytes) -> bytes:
        """Train for a secure round, keep the update, and open the round's
        protocol run with ``opening`` (an encoded ``AdvertiseRequest``, from
        the network); the answer is the encoded ``KeyAdvert``. Every earlier
        round's state is forgotten (a new round means the coordinator gave up
        on it).

        The update is checked here (:func:`fedtrain.validation.rejection_reason`),
        since the coordinator will only ever see it masked. Under
        ``compression.up = 'randk'`` (the one codec secure aggregation takes:
        every client keeps the round's coordinates, so the masked sums add up)
        the update is encoded with this client's error feedback and its
        ``k`` kept values masked in index order, as in a simulation
        (:class:`~fedtrain.training.compressing.CompressingExecutor` with
        ``dense`` under :class:`~fedtrain.transport.in_process.InProcessSecureAggregation`):
        the setup's ``vector_length`` must be the ``k`` of this client's own
        config (the model's size without randk), whatever the coordinator says.
        """
        from fedtrain.compression import decode, from_wire
        from fedtrain.config import Compression
        from fedtrain.training.train_task import TrainTask
        from fedtrain.privacy.noise import SecureGaussian
        from fedtrain.secure import wire
        from fedtrain.secure.messages import AdvertiseRequest
        from fedtrain.secure.protocol import SecureClient
        from fedtrain.types import ClientUpdate
        from fedtrain.validation import rejection_reason

        self._held.clear()
        request = wire.decode(opening, AdvertiseRequest)
        setup = request.setup
        task = TrainTask.from_json(json.loads(task_json))
        params = self.global_model_(params)
        coordinates = None if self._uplink is None else self._uplink.secure_coordinates(rnd, params.size)
        length = params.size if coordinates is None else coordinates.numel()
        if setup.vector_length != length:
            raise ValueError(
                f"client {self.name}: setup.vector_length = {setup.vector_length}, this client masks {length} values "
                f"(the model has {params.size}"
                + (f"; compression.up = 'randk' keeps {length})" if coordinates is not None else ")")
            )
        if task.privacy.distributed_noise > 0 and setup.noise_stddev <= 0:
            raise ValueError(
                f"client {self.name}: the task asks for distributed noise, the setup has noise_stddev = "
                f"{setup.noise_stddev}; refusing to send an update without its noise share"
            )
        client = SecureClient(request.recipient, setup, SecureGaussian() if setup.noise_stddev > 0 else None)
        if self._uplink is not None and self._uplink.method is not Compression.RANDK:
            raise ValueError(
                f"client {self.name}: compression.up = {self._uplink.method.value!r} with secure aggregation: "
                "allowed with it: 'none' or 'randk'"
            )
        reply = self.train(rnd, task_json, params)
        if reply.compressed is not None:
            vector = decode(from_wire(reply.compressed, params.size), params.size)
            reply = TrainReply(vector.numpy(), reply.num_examples, reply.metrics)
        vector = torch.from_numpy(np.ascontiguousarray(reply.update, dtype=np.float32))
        update = ClientUpdate(self.name, vector, reply.num_examples, task.kind)
        reason = rejection_reason(update, vector.numel(), task.kind)
        if reason is not None:
            raise ValueError(f"client refused to mask its update: {reason}")
        masked = reply.update if coordinates is None else vector[coordinates].numpy()
        self._held[rnd] = HeldUpdate(masked, reply.num_examples, client)
        return wire.encode(client.advertise())

    def secure(self, request: SecureRequest) -> bytes:
        """Answer one stage of round ``request.round``'s secure aggregation:
        decode the coordinator's message safely, advance the round's
        :class:`SecureClient`, return its encoded reply. The clear update is
        dropped as soon as it is masked, the round's state after unmasking."""
        from fedtrain.secure import wire
        from fedtrain.secure.messages import Neighbourhood, ShareDelivery, UnmaskRequest

        held = self._held.get(request.round)
        if held is None:
            raise RuntimeError(
                f"client {self.name}: no update kept for round {request.round} "
                f"(kept: {sorted(self._held) or 'none'}); it must train for the round first"
            )
        client = held.client
        if request.stage is SecureStage.SHARE_KEYS:
            return wire.encode(client.share_keys(wire.decode(request.payload, Neighbourhood)))
        if request.stage is SecureStage.MASKED_INPUT:
            if held.update is None:
                raise RuntimeError(f"client {self.name}: round {request.round}'s update was already masked")
            delivery = wire.decode(request.payload, ShareDelivery)
            weight = min(held.num_examples, client.setup.max_weight)
            masked = client.masked_input(delivery, held.update, weight)
            held.update = None
            return wire.encode(masked)
        if request.stage is SecureStage.UNMASK:
            response = client.unmask(wire.decode(request.payload, UnmaskRequest))
            del self._held[request.round]
            return wire.encode(response)
        raise ValueError(f"stage {request.stage!r}: allowed: {[s.value for s in SecureStage]}")

    def handle(self, request: tuple[RequestKind, Any]) -> tuple[str, Any]:
        """One relayed request → ``("ok", result)`` or ``("error", reason)``."""
        kind, body = request
        if kind in (RequestKind.TRAIN, RequestKind.TRAIN_SECURE) and self.delay_seconds:
            log.info("client %s: %s %g s (--delay)", self.name, HELD_JOB, self.delay_seconds)
            time.sleep(self.delay_seconds)
        try:
            with self.lock:
                if kind is RequestKind.HELLO:
                    return "ok", self.hello(Hello.from_json(body))
                if kind is RequestKind.TRAIN:
                    rnd, task_json, params = body
                    return "ok", self.train(int(rnd), task_json, params)
                if kind is RequestKind.TRAIN_SECURE:
                    rnd, task_json, params, opening = body
                    return "ok", self.train_secure(int(rnd), task_json, params, opening)
                if kind is RequestKind.SECURE:
                    if not isinstance(body, SecureRequest):
                        raise TypeError(f"secure request body is a {type(body).__name__}, expected SecureRequest")
                    return "ok", self.secure(body)
            return "error", f"unknown request {kind!r}; allowed: {[k.value for k in RequestKind]}"
        except PluginRefused as exc:
            log.error("%s", exc)
            return "error", str(exc)
        except Exception as exc:  # reported to the coordinator as this client's failure
            log.exception("client %s: %s request failed", self.name, kind)
            return "error", f"{type(exc).__name__}: {exc}"


class WorkerServer:
    """Serves a :class:`ClientWorker` on a Unix socket in ``folder``; the
    address and key reach the relay through the SuperNode's node config."""

    def __init__(self, worker: ClientWorker, folder: Path) -> None:
        self.worker = worker
        self.address = str(folder / "worker.sock")
        self.authkey = secrets.token_bytes(AUTHKEY_BYTES)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._thread = threading.Thread(target=self._serve, name="fedtrain-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:
                return
            except Exception:  # a relay that fails the HMAC challenge
                log.warning("refused a local connection that did not know the worker key")
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Connection) -> None:
        with conn:
            try:
                conn.send(self.worker.handle(conn.recv()))
            except (EOFError, OSError):
                log.warning("relay went away before its answer")

    def close(self) -> None:
        self._listener.close()
