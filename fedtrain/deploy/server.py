"""``fedtrain server``: the coordinator of a deployment, and the Flower
``ServerApp`` it runs.

:func:`serve` starts a SuperLink (:mod:`fedtrain.deploy.superlink`: the
Fleet API alone on ``--address``, with TLS and SuperNode authentication;
every other API on loopback), registers every ``client-N.pub`` of the
certificate folder, opens the Fleet address, writes the one-run Flower app
(:data:`fedtrain.deploy.app.APP_PYPROJECT`) whose ``ServerApp`` is
:data:`server_app`, submits it on loopback (what ``flwr run`` does, called
in process: :mod:`fedtrain.deploy.control`), shows progress from the run
folder's ``metrics.jsonl``, and reads the run's real status at the end (a
submission succeeds whether or not the run will). The coordinator never
dials its own ``--address``, so its certificate need only carry the names
clients dial; with ``--insecure`` (no TLS, nobody authenticated) it binds to
loopback only.

:data:`server_app` runs in Flower's ServerApp process: it reads the
coordinator's :class:`DeployRequest` from the run folder and runs the same
engine, strategy, privacy policy and run folder as a simulation
(:func:`coordinate`, built by :mod:`fedtrain.run`), with
:class:`~fedtrain.transport.flower.FlowerTransport` (or its secure variant)
carrying the rounds. Flower keeps that process's output to itself, so
fedtrain's log lines there go to :data:`SERVERAPP_LOG`, and the coordinator
shows them on its console as they come, with each connection the SuperLink
refused and why (:func:`refusal_reason`).

Flower's state (``FLWR_HOME``), logs and app live in ``RUN_DIR/flower``.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtrain.certs import CertificateSet
from fedtrain.config import Config, RunMode, from_dict, to_dict
from fedtrain.deploy.addresses import LOOPBACK, free_port, is_loopback, local_dial, split_address
from fedtrain.deploy.app import APP_PYPROJECT
from fedtrain.deploy.control import ControlClient, RunStatus
from fedtrain.deploy.errors import DeployError, check_positive
from fedtrain.deploy.flower import (
    ACTIVATION_LOG,
    KEY_HOLD_SECONDS,
    KEY_IN_USE,
    STATUS_POLL_SECONDS,
    SUPERLINK_TASK_POLL,
    TASK_FINISHED,
    UNKNOWN_KEY,
    bound_reply_pulls,
    check_flower_version,
    connection_toml,
    flower_env,
)
from fedtrain.deploy.processes import LogTail, Processes, entry_point, exit_when_orphaned, tail, wait_listening
from fedtrain.deploy.superlink import REFUSAL_MARK, superlink_args
from fedtrain.errors import UsageError
from fedtrain.transport.flower import FlowerTransport, SecureFlowerTransport
from fedtrain.transport.relay import DEFAULT_POLL, ClientInfo, Hello

if TYPE_CHECKING:
    from fedtrain.run import SecurePlan

log = logging.getLogger(__name__)

REQUEST_FILE = "deploy.json"
FLOWER_DIR = "flower"
DEFAULT_ADDRESS = "127.0.0.1:9092"
DEFAULT_TIMEOUT = 600.0
"""Seconds the coordinator waits for a client's update when
``client.timeout`` is 0 (no limit makes no sense once clients can vanish)."""

SERVERAPP_LOG = "serverapp.log"
"""``RUN_DIR/flower/serverapp.log``: the log lines (INFO and above) of
fedtrain's code inside Flower's ServerApp process (clients joining, refusing
the run, failing, round progress), one JSON object a line, shown on the
coordinator's console as they come."""


@dataclass(frozen=True)
class DeployRequest:
    """What ``fedtrain server`` hands to its ``ServerApp``, through
    ``RUN_DIR/deploy.json``."""

    run_dir: str
    config: Mapping[str, Any]
    resume: bool
    expected_clients: int
    wait_seconds: float
    timeout: float
    poll_seconds: float = DEFAULT_POLL
    trust_checkpoint: bool = False
    authenticated: bool = False
    """Clients authenticate with registered keys: each client id is then
    bound to the key that first claimed it (:class:`CoordinatorTransport`)."""

    def write(self) -> None:
        Path(self.run_dir, REQUEST_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, run_dir: Path) -> "DeployRequest":
        return cls(**json.loads((run_dir / REQUEST_FILE).read_text()))


class CoordinatorTransport(Protocol):
    """The part of :class:`fedtrain.transport.flower.FlowerTransport` the
    coordinator uses besides training rounds."""

    clients: dict[str, ClientInfo]
    ids_follow_keys: bool

    def wait_for_clients(self, expected: int, minimum: int, wait: float) -> list[str]: ...


def coordinate(
    request: DeployRequest, make_transport: Callable[[Hello, SecurePlan | None], CoordinatorTransport]
) -> None:
    """The coordinator's side of a deployed run, inside Flower's ServerApp:
    the same engine, strategy, privacy policy and run folder as a simulation.

    With ``secure.aggregation = true`` the backend is asked for secure
    aggregation (the clients mask their updates and the coordinator learns
    only their sum), after the strategy was checked to work on a sum alone.

    fedtrain's log lines from here on (clients joining, refusing the run,
    failing, round progress) reach the coordinator's console through
    :data:`SERVERAPP_LOG`."""
    with _serverapp_log(Path(request.run_dir)):
        _coordinate(request, make_transport)


def _coordinate(
    request: DeployRequest, make_transport: Callable[[Hello, SecurePlan | None], CoordinatorTransport]
) -> None:
    from fedtrain.compression import CompressionPlan
    from fedtrain.run import build_engine, build_strategy, build_trainable, client_data, run_engine
    from fedtrain.training.trainer import resolve_device

    started = time.perf_counter()
    config = from_dict(request.config)
    device = resolve_device(config.client.device)
    data = client_data(config, device)
    strategy, secure = build_strategy(config, deployed=True)
    test_set = (data.x_test, data.y_test)
    trainable = build_trainable(config, data.input_shape, data.num_classes, test_set, device)
    transport = make_transport(
        Hello(to_dict(config), data.input_shape, data.num_classes, trainable.fingerprint()), secure
    )
    transport.ids_follow_keys = request.authenticated
    names = transport.wait_for_clients(request.expected_clients, config.strategy.min_clients, request.wait_seconds)
    dispatcher = None
    if config.run.mode is RunMode.ASYNC:
        from fedtrain.transport.flower_dispatcher import FlowerDispatcher

        dispatcher = FlowerDispatcher(transport)  # type: ignore[arg-type]
    engine = build_engine(
        config, strategy, transport, trainable, test_set,  # type: ignore[arg-type]
        {n: transport.clients[n].num_records for n in names},
        clients_per_round=min(config.strategy.clients_per_round, len(names)),
        compression=CompressionPlan.of(config.compression, config.run.seed),
        dispatcher=dispatcher,
    )
    run_engine(config, engine, trainable, trainable.initial_params(), Path(request.run_dir), False,
               request.resume, started, request.trust_checkpoint, names=trainable.trainer.objective.metric_names)


server_app = ServerApp()
"""The ``ServerApp`` of fedtrain's Flower app (:data:`fedtrain.deploy.app.APP_COMPONENTS`)."""


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    exit_when_orphaned(os.getppid())
    request = DeployRequest.read(Path(str(context.run_config["run-dir"])))
    bound_reply_pulls(request.timeout)

    def make_transport(hello: Hello, secure: SecurePlan | None) -> FlowerTransport:
        from fedtrain.compression import ClientCopies
        from fedtrain.privacy.sample_level import min_records

        config = from_dict(hello.config)
        floor = min_records(config)
        copies = ClientCopies.of(config.compression, config.run.seed)
        if secure is None:
            return FlowerTransport(grid, hello, request.timeout, request.poll_seconds, floor, copies)
        return SecureFlowerTransport(
            grid, hello, request.timeout, request.poll_seconds, secure.settings, secure.weighted, floor, copies
        )

    coordinate(request, make_transport)


def check_secure_deployment(config: Config) -> None:
    """Refuse, before anything starts, a ``[secure]`` table a deployment
    cannot honour (:func:`fedtrain.run.build_strategy` with ``deployed``)."""
    from fedtrain.run import build_strategy

    build_strategy(config, deployed=True)


@dataclass(frozen=True)
class ServerOptions:
    """``fedtrain server``'s command line."""

    config: Config
    run_dir: Path
    certs: Path | None
    address: str = DEFAULT_ADDRESS
    resume: bool = False
    wait_seconds: float = 300.0
    progress: bool = True
    poll_seconds: float = DEFAULT_POLL
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        check_positive("--wait", self.wait_seconds)
        check_positive("--poll", self.poll_seconds)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return json.dumps({"level": record.levelno, "name": record.name, "message": text})


@contextlib.contextmanager
def _serverapp_log(run_dir: Path) -> Iterator[None]:
    """While inside, fedtrain's log lines (INFO and above) in this
    (ServerApp) process also go to :data:`SERVERAPP_LOG`, where the
    coordinator's console picks them up: Flower keeps a ServerApp's own
    output to itself."""
    (run_dir / FLOWER_DIR).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / FLOWER_DIR / SERVERAPP_LOG, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger("fedtrain")
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def refusal_reason(line: str, key_names: Mapping[str, str]) -> str | None:
    """What a SuperLink log line says about a refused connection, for the
    coordinator's operator; None when it says nothing of the kind.
    ``key_names`` maps a registered client's PEM public key to its file."""
    mark = line.find(REFUSAL_MARK)
    if mark >= 0:
        return line[mark + len(REFUSAL_MARK):].strip()
    found = ACTIVATION_LOG.search(line)
    if found is None:
        return None
    why = found["why"]
    if UNKNOWN_KEY in why:
        return "a client whose key is not registered (not among the client-N.pub of --certs)"
    in_use = KEY_IN_USE.search(why)
    if in_use is None:
        return f"a client whose activation failed: {why}"
    pem = codecs.decode(found["key"], "unicode_escape").strip()
    holder = key_names.get(pem, f"the key of node {in_use['node']}")
    return (
        f"a second client with {holder}: a client with that key is connected already (two clients cannot "
        f"share a key; one stopped without a clean exit holds its key for up to {KEY_HOLD_SECONDS} s)"
    )


def _watch_logs(link_log: Path, app_log: Path, key_names: Mapping[str, str], stop: threading.Event) -> None:
    """Show on the coordinator's console what it would otherwise never see:
    each connection the SuperLink refused, with its reason (once per reason
    and check, with a count), and the ServerApp's log lines."""
    link, app = LogTail(link_log), LogTail(app_log)
    while True:
        stopping = stop.wait(0.5)
        refused = Counter(r for r in (refusal_reason(line, key_names) for line in link.lines()) if r)
        for reason, count in refused.items():
            log.warning("refused %d connection(s): %s", count, reason)
        for line in app.lines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                logging.getLogger(str(row["name"])).log(int(row["level"]), "%s", row["message"])
        if stopping:
            return


def serve(options: ServerOptions) -> RunStatus:
    """Run a deployed coordinator to the end; the run's Flower status.

    The SuperLink (:func:`fedtrain.deploy.superlink.superlink_main`) first
    listens on loopback only; the clients' keys are registered there, then
    its Fleet API opens on ``--address``, and the run is submitted, again on
    loopback. Each connection the SuperLink refuses, and the ServerApp's log
    lines, are logged here as they come.

    Raises :class:`~fedtrain.deploy.errors.DeployError` with the reason when
    the run did not complete.
    """
    from fedtrain import __version__
    from fedtrain.results import METRICS_FILE

    host, port = split_address(options.address, "--address")
    check_flower_version()
    check_secure_deployment(options.config)
    if options.certs is None and not is_loopback(host):
        raise UsageError(
            f"--address {options.address} with --insecure: a plain-text listener that authenticates nobody may "
            "bind to loopback only (127.0.0.1, ::1, localhost); give --certs DIR to serve clients on other machines"
        )
    certs = None if options.certs is None else CertificateSet(options.certs)
    if certs is not None:
        certs.require_server()
        if not certs.client_keys():
            raise DeployError(f"--certs {certs.root}: no client-N.pub to register; add clients with fedtrain certs")
    run_dir = options.run_dir.resolve()
    flower = run_dir / FLOWER_DIR
    home, app = flower / "home", flower / "app"
    for folder in (home, app):
        folder.mkdir(parents=True, exist_ok=True)
    control_port = free_port()
    while control_port == port:
        control_port = free_port()
    (home / "config.toml").write_text(connection_toml(f"{LOOPBACK}:{control_port}"))
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__, run_dir=json.dumps(str(run_dir))))
    expected = len(certs.client_keys()) if certs is not None else options.config.data.num_clients
    timeout = options.config.client.timeout or DEFAULT_TIMEOUT
    DeployRequest(
        str(run_dir), to_dict(options.config), options.resume, expected, options.wait_seconds, timeout,
        options.poll_seconds, options.trust_checkpoint, authenticated=certs is not None,
    ).write()

    opened = flower / "fleet-open"
    opened.unlink(missing_ok=True)
    (flower / SERVERAPP_LOG).write_bytes(b"")
    if certs is None:
        log.warning("--insecure: the SuperLink accepts plain-text connections from any client")
    tls = None if certs is None else (certs.server_cert, certs.server_key, certs.ca)
    args = [*entry_point("superlink"), *superlink_args(options.address, control_port, opened, tls)]
    link_log = flower / "superlink.log"
    stop = threading.Event()
    with Processes() as procs, contextlib.ExitStack() as closing:
        link = procs.start(args, flower_env(home, SUPERLINK_TASK_POLL), link_log)
        wait_listening(LOOPBACK, control_port, link, link_log, 30.0)
        control = closing.enter_context(ControlClient(f"{LOOPBACK}:{control_port}"))
        if certs is not None:
            for key in certs.client_keys():
                control.register(key)
        opened.touch()
        wait_listening(local_dial(host), port, link, link_log, 30.0)
        key_names = certs.client_key_pems() if certs is not None else {}
        watcher = threading.Thread(
            target=_watch_logs, args=(link_log, flower / SERVERAPP_LOG, key_names, stop), daemon=True
        )
        watcher.start()
        run_id = control.start_run(app)
        log.info(
            "run %s submitted; clients dial %s:%d (Fleet API only; Control API on %s:%d); waiting for %d client(s)",
            run_id, host, port, LOOPBACK, control_port, expected,
        )
        try:
            status = _follow(control, run_id, run_dir / METRICS_FILE, options, link, link_log)
        finally:
            stop.set()
            watcher.join(5.0)
    if not status.completed:
        raise DeployError(
            f"run {run_id} ended {status.status}: {status.details}; "
            f"SuperLink log: {link_log}; ServerApp log: {flower / SERVERAPP_LOG}"
        )
    return status


def _follow(
    control: ControlClient, run_id: int, metrics: Path, options: ServerOptions,
    link: subprocess.Popen[bytes], link_log: Path,
) -> RunStatus:
    """Show progress from ``metrics.jsonl`` until the run finishes; its status."""
    from fedtrain.progress import RoundProgress
    from fedtrain.training.task import load_task
    from fedtrain.types import RoundRecord

    names = load_task(options.config.task.name, options.config.task.options).metric_names
    done = len(metrics.read_text().splitlines()) if options.resume and metrics.exists() else 0
    bar = RoundProgress(options.config.run.rounds, done, names=names) if options.progress else None
    offset = metrics.stat().st_size if metrics.exists() else 0
    last_check = time.monotonic()
    link_lines, ended = LogTail(link_log), False
    with bar if bar is not None else contextlib.nullcontext():
        while True:
            if link.poll() is not None:
                raise DeployError(f"the SuperLink exited with code {link.returncode}:\n{tail(link_log)}")
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        offset += len(line.encode())
                        if bar is not None:
                            bar.on_round(RoundRecord.from_json(json.loads(line), names.names))
            ended = ended or any(
                (m := TASK_FINISHED.search(line)) is not None and int(m["run"]) == run_id for line in link_lines.lines()
            )
            if time.monotonic() - last_check > (0.5 if ended else STATUS_POLL_SECONDS):
                last_check = time.monotonic()
                status = control.status(run_id)
                if status.finished:
                    return status
            time.sleep(0.25)
