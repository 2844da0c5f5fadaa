"""``fedtrain server`` and ``fedtrain client``: a deployment on Flower's
SuperLink and SuperNodes, with everything Flower needs handled here.

The coordinator (``fedtrain server``) starts a SuperLink with TLS and
SuperNode authentication, registers every ``client-N.pub`` of the
certificate folder, writes a one-run Flower app whose ``ServerApp`` is
:data:`fedtrain.backends.flower.server_app`, submits it with ``flwr run``,
shows progress from the run folder's ``metrics.jsonl``, and reads the run's
real status at the end (``flwr run`` exits 0 even when a run fails).

A client (``fedtrain client``) starts its warm :class:`ClientWorker` and a
SuperNode whose ``ClientApp`` relays each message to it.

Flower's state (``FLWR_HOME``), logs and app live in ``RUN_DIR/flower`` on
the coordinator and in a temporary folder on a client; telemetry is off and
runtime dependency installation is disabled (fedtrain is already installed).
Only :mod:`fedtrain.backends.flower` imports ``flwr``; this module drives
Flower's command-line programs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from fedtrain.certs import CertificateSet
from fedtrain.config import Config, ConfigError, from_dict, to_dict
from fedtrain.relay import NODE_KEY_FILE, NODE_WORKER, ClientInfo, Hello

if TYPE_CHECKING:
    from fedtrain.secure.setting import SecureSettings

log = logging.getLogger(__name__)

REQUEST_FILE = "deploy.json"
FLOWER_DIR = "flower"
CONNECTION = "fedtrain"
DEFAULT_ADDRESS = "0.0.0.0:9092"
DEFAULT_TIMEOUT = 600.0
"""Seconds the coordinator waits for a client's update when
``client.timeout`` is 0 (no limit makes no sense once clients can vanish)."""

REFUSED_KEY = "No SuperNode found with the given public key"

DEFAULT_POLL = 0.1
"""Seconds between a waiting party's requests (coordinator for replies,
SuperNode for messages, Flower's SuperExec for tasks). Flower's defaults
(3 s, 3 s, 1 s) cost seconds of latency per round; ``--poll 3`` restores them."""

FLOWER_IDLE_POLL = 3.0
"""Seconds Flower's SuperNode sleeps between asking for messages when idle
(hard-coded in ``flwr.supernode.start_client_internal``, 1.41)."""

FLOWER_SUPEREXEC_POLL = 1.0
"""Flower's default ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``."""


class DeployError(RuntimeError):
    """A deployment could not start or its run did not complete."""


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

    def write(self) -> None:
        Path(self.run_dir, REQUEST_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, run_dir: Path) -> "DeployRequest":
        return cls(**json.loads((run_dir / REQUEST_FILE).read_text()))


@dataclass(frozen=True)
class SecureDeployment:
    """Secure aggregation for a deployed run (``secure.aggregation = true``):
    the protocol's settings, and whether clients are weighted by their record
    counts (the strategy's ``weighted``; distributed DP always counts each once)."""

    settings: SecureSettings
    weighted: bool


class RoundBackend(Protocol):
    """The part of :class:`fedtrain.backends.flower.FlowerBackend` the
    coordinator uses besides training rounds."""

    clients: dict[str, ClientInfo]

    def wait_for_clients(self, expected: int, minimum: int, wait: float) -> list[str]: ...


def coordinate(
    request: DeployRequest, make_backend: Callable[[Hello, SecureDeployment | None], RoundBackend]
) -> None:
    """The coordinator's side of a deployed run, inside Flower's ServerApp:
    the same engine, strategy, privacy policy and run folder as a simulation.

    With ``secure.aggregation = true`` the backend is asked for secure
    aggregation (the clients mask their updates and the coordinator learns
    only their sum), after the strategy was checked to work on a sum alone."""
    from fedtrain.client import LocalTrainer, resolve_device
    from fedtrain.engine import Engine, RngStreams
    from fedtrain.layout import ParamLayout
    from fedtrain.privacy.setting import build_policy
    from fedtrain.sampling import make_sampler
    from fedtrain.simulation import client_data, prepare_model, run_engine
    from fedtrain.strategy import load_strategy

    started = time.perf_counter()
    config = from_dict(request.config)
    device = resolve_device(config.client.device)
    data = client_data(config, device)
    strategy = load_strategy(config.strategy.name, config.strategy.options)
    secure: SecureDeployment | None = None
    if config.secure.aggregation:
        from fedtrain.secure.setting import SecureSettings, check_strategy

        check_strategy(config, strategy)
        if config.secure.simulated_dropout:
            raise ConfigError(
                f"secure.simulated_dropout = {config.secure.simulated_dropout}: allowed in a deployment: 0"
            )
        secure = SecureDeployment(SecureSettings.of(config), bool(getattr(strategy, "weighted", True)))
    model, grad_sample_mode = prepare_model(config, data.input_shape, data.num_classes, data.x_test[:2])
    layout = ParamLayout.of(model.state_dict())
    trainer = LocalTrainer(model, layout, device)
    backend = make_backend(Hello(to_dict(config), data.input_shape, data.num_classes), secure)
    names = backend.wait_for_clients(request.expected_clients, config.strategy.min_clients, request.wait_seconds)
    sampler = make_sampler(
        config.strategy.sampling, min(config.strategy.clients_per_round, len(names)), len(names)
    )
    privacy = build_policy(
        config, strategy, {n: backend.clients[n].num_records for n in names},
        sampler.expected_size(len(names)), grad_sample_mode,
    )
    x_test, y_test = data.x_test, data.y_test
    engine = Engine(
        strategy=strategy,
        backend=backend,  # type: ignore[arg-type]
        sampler=sampler,
        evaluate=lambda p: trainer.evaluate(p, x_test, y_test),
        clients=names,
        client=config.client,
        min_clients=config.strategy.min_clients,
        rngs=RngStreams.from_seed(config.run.seed),
        privacy=privacy,
    )
    params = layout.flatten(model.state_dict()).to(device)
    run_engine(config, engine, layout, params, Path(request.run_dir), False, request.resume, started)


# ---------------------------------------------------------------- processes


def check_secure_deployment(config: Config) -> None:
    """Refuse, before anything starts, a ``[secure]`` table a deployment
    cannot honour: a strategy that needs each update on its own, or
    ``secure.simulated_dropout`` (a simulation knob; deployed clients drop
    out for real)."""
    from fedtrain.secure.setting import check_strategy
    from fedtrain.strategy import load_strategy

    if not config.secure.aggregation:
        return
    if config.secure.simulated_dropout:
        raise ConfigError(
            f"secure.simulated_dropout = {config.secure.simulated_dropout}: only a simulation drops clients "
            "on purpose; allowed in a deployment: 0"
        )
    check_strategy(config, load_strategy(config.strategy.name, config.strategy.options))


def _flower_env(home: Path, poll_seconds: float = DEFAULT_POLL) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(min(poll_seconds, FLOWER_SUPEREXEC_POLL)),
        PYTHONUNBUFFERED="1",
    )
    return env


def _program(name: str) -> str:
    """Flower's console script ``name``, next to this Python when it is there."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: install Flower (pip install 'flwr>=1.41,<2')")
    return found


def _check_positive(parameter: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{parameter} {value}: must be a positive number of seconds")


def split_address(address: str, parameter: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), with an error naming ``parameter``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{parameter} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGTERM it when this process dies,
    even by SIGKILL, so no SuperLink or SuperNode outlives its fedtrain."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, read from /proc (empty where there is none)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree = _children()
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Processes:
    """Child processes that end with this object: each in its own session,
    so its own children (a SuperLink's ServerApp, a SuperNode's ClientApps)
    end with it, and each told to end when this process dies."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")
        proc = subprocess.Popen(
            list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        out.close()
        self._procs.append(proc)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child and everything it started (Flower's SuperExec
        starts ServerApps and ClientApps in sessions of their own), then
        SIGKILL whatever is left after ``grace`` seconds."""
        targets = [pid for proc in self._procs if proc.poll() is None for pid in (proc.pid, *_descendants(proc.pid))]
        targets += [pid for proc in self._procs if proc.poll() is not None for pid in _descendants(proc.pid)]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
            time.sleep(0.1)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in self._procs:
            proc.wait()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log_path: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeployError(f"the SuperLink did not listen on {host}:{port} within {wait:g} s:\n{_tail(log_path)}")


def _flwr(home: Path, args: Sequence[str], timeout: float = 120.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; its JSON answer, or DeployError."""
    done = subprocess.run(
        [_program("flwr"), *args, "--format", "json"], env=_flower_env(home),
        capture_output=True, text=True, timeout=timeout,
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-2000:]}
    if not answer.get("success", False):
        raise DeployError(f"flwr {' '.join(args[:2])} failed: {answer.get('error-message', answer)}")
    return dict(answer)


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtrain-run"
version = "{version}"
description = "One fedtrain run, written by fedtrain server"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtrain"

[tool.flwr.app.components]
serverapp = "fedtrain.backends.flower:server_app"
clientapp = "fedtrain.backends.flower:client_app"

[tool.flwr.app.config]
run-dir = {run_dir}
"""


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

    def __post_init__(self) -> None:
        _check_positive("--wait", self.wait_seconds)
        _check_positive("--poll", self.poll_seconds)


def _connection_toml(dial: str, certs: CertificateSet | None) -> str:
    security = "insecure = true" if certs is None else f"root-certificates = {json.dumps(str(certs.ca.resolve()))}"
    return f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{dial}"\n{security}\n'


def _watch_refusals(log_path: Path, stop: threading.Event) -> None:
    """Tell the operator, once per refusal, that the SuperLink turned a node away."""
    seen = 0
    while not stop.wait(0.5):
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        count = text.count(REFUSED_KEY)
        if count > seen:
            log.warning(
                "refused %d connection(s) from a client whose key is not registered "
                "(not among the client-N.pub of --certs)", count - seen,
            )
            seen = count


def serve(options: ServerOptions) -> dict[str, Any]:
    """Run a deployed coordinator to the end; the run's Flower status.

    Raises :class:`DeployError` with the reason when the run did not complete.
    """
    from fedtrain import __version__
    from fedtrain.results import METRICS_FILE

    host, port = split_address(options.address, "--address")
    check_secure_deployment(options.config)
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
    dial = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}"
    (home / "config.toml").write_text(_connection_toml(dial, certs))
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__, run_dir=json.dumps(str(run_dir))))
    expected = len(certs.client_keys()) if certs is not None else options.config.data.num_clients
    timeout = options.config.client.timeout or DEFAULT_TIMEOUT
    DeployRequest(
        str(run_dir), to_dict(options.config), options.resume, expected, options.wait_seconds, timeout,
        options.poll_seconds,
    ).write()

    args = [_program("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if certs is None:
        log.warning("--insecure: the SuperLink accepts plain-text connections from any client")
        args.append("--insecure")
    else:
        args += ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                 "--ssl-ca-certfile", str(certs.ca), "--enable-supernode-auth"]
    link_log = flower / "superlink.log"
    stop = threading.Event()
    with Processes() as procs:
        link = procs.start(args, _flower_env(home, options.poll_seconds), link_log)
        _wait_listening(dial.rpartition(":")[0], port, link, link_log, 30.0)
        if certs is not None:
            for key in certs.client_keys():
                _flwr(home, ["supernode", "register", str(key), CONNECTION])
            threading.Thread(target=_watch_refusals, args=(link_log, stop), daemon=True).start()
        run_id = str(_flwr(home, ["run", str(app), CONNECTION])["run-id"])
        log.warning("run %s submitted to the SuperLink on %s:%d; waiting for %d client(s)", run_id, host, port, expected)
        try:
            status = _follow(home, run_id, run_dir / METRICS_FILE, options, link, link_log)
        finally:
            stop.set()
    if status.get("status") != "finished:completed":
        raise DeployError(
            f"run {run_id} ended {status.get('status')}: {status.get('status-details')}; "
            f"ServerApp log: {flower / 'superlink.log'}"
        )
    return status


def _follow(
    home: Path, run_id: str, metrics: Path, options: ServerOptions,
    link: subprocess.Popen[bytes], link_log: Path,
) -> dict[str, Any]:
    """Show progress from ``metrics.jsonl`` until the run finishes; its status."""
    from fedtrain.progress import RoundProgress
    from fedtrain.types import RoundRecord

    done = len(metrics.read_text().splitlines()) if options.resume and metrics.exists() else 0
    bar = RoundProgress(options.config.run.rounds, done) if options.progress else None
    offset = metrics.stat().st_size if metrics.exists() else 0
    last_check = 0.0
    with bar if bar is not None else contextlib.nullcontext():
        while True:
            if link.poll() is not None:
                raise DeployError(f"the SuperLink exited with code {link.returncode}:\n{_tail(link_log)}")
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        offset += len(line.encode())
                        if bar is not None:
                            bar.on_round(RoundRecord.from_json(json.loads(line)))
            if time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                runs = _flwr(home, ["ls", CONNECTION, "--run-id", run_id]).get("runs", [])
                if runs and str(runs[0].get("status", "")).startswith("finished"):
                    return dict(runs[0])
            time.sleep(0.25)


# ------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientOptions:
    """``fedtrain client``'s command line."""

    server: str
    certs: Path | None
    key: Path | None
    partition: str | None
    data: Path | None
    device: str = "config"
    connect_seconds: float = 60.0
    poll_seconds: float = DEFAULT_POLL

    def __post_init__(self) -> None:
        _check_positive("--connect-timeout", self.connect_seconds)
        _check_positive("--poll", self.poll_seconds)


REFUSAL_HINTS = (
    ("Failed to activate SuperNode", "the coordinator refused this client: its public key {pub} is not "
     "registered there (the coordinator registers the client-N.pub of its --certs folder)"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS verification of {server} failed: the coordinator's certificate is not "
     "signed by {ca}, or {host} is not among its host names (fedtrain certs --hosts)"),
    ("certificate verify failed", "TLS verification of {server} failed: the coordinator's certificate is not "
     "signed by {ca}, or {host} is not among its host names (fedtrain certs --hosts)"),
    ("could not establish a connection", "could not reach the coordinator at {server}{plain}"),
)


def _refusal(log_text: str, options: ClientOptions) -> str:
    host = options.server.rpartition(":")[0]
    ca = options.certs / "ca.pem" if options.certs else "the CA"
    pub = f"{options.key}.pub" if options.key else "-"
    plain = " over plain text; a coordinator with TLS refuses --insecure clients" if options.certs is None else ""
    for needle, message in REFUSAL_HINTS:
        if needle in log_text:
            return message.format(pub=pub, server=options.server, ca=ca, host=host, plain=plain)
    return f"the SuperNode stopped:\n{log_text.strip()[-1500:]}"


def join(options: ClientOptions, stop: threading.Event | None = None) -> int:
    """Serve one client until interrupted (or ``stop`` is set); raises
    :class:`DeployError` when the coordinator refuses it or cannot be reached."""
    from fedtrain.client_worker import ClientWorker, WorkerServer

    split_address(options.server, "--server")
    if options.poll_seconds < FLOWER_IDLE_POLL:
        launcher = [sys.executable, "-m", "fedtrain.backends.flower", "--poll", str(options.poll_seconds)]
    else:
        launcher = [_program("flower-supernode")]
    args = [*launcher, "--superlink", options.server, "--max-wait-time", str(options.connect_seconds)]
    if options.certs is None:
        log.warning("--insecure: this client sends its updates in plain text")
        args.append("--insecure")
    else:
        ca = options.certs / "ca.pem"
        if not ca.is_file():
            raise FileNotFoundError(f"--certs {options.certs}: no ca.pem there")
        if options.key is None or not options.key.is_file():
            raise FileNotFoundError(f"--key {options.key}: no such private key (fedtrain certs writes client-N)")
        args += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(options.key)]
    name = options.partition if options.partition is not None else Path(str(options.data)).stem
    worker = ClientWorker(name, options.partition, options.data, options.device)
    with tempfile.TemporaryDirectory(prefix="fedtrain-client-") as tmp:
        folder = Path(tmp)
        server = WorkerServer(worker, folder)
        key_file = folder / "worker.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server.authkey.hex())
        server.start()
        node_config = f'{NODE_WORKER}="{server.address}" {NODE_KEY_FILE}="{key_file}"'
        args += ["--node-config", node_config, "--port", str(free_port())]
        node_log = folder / "supernode.log"
        deadline = time.monotonic() + options.connect_seconds
        with Processes() as procs:
            log.warning("client %s connecting to %s", name, options.server)
            while True:
                node_log.write_bytes(b"")
                node = procs.start(args, _flower_env(folder / "home", options.poll_seconds), node_log)
                joined = False
                while node.poll() is None:
                    if stop is not None and stop.is_set():
                        return 0
                    if not joined and "SuperNode ID" in node_log.read_text(errors="replace"):
                        joined = True
                        log.warning("client %s connected to %s", name, options.server)
                    time.sleep(0.2)
                text = node_log.read_text(errors="replace")
                if joined:
                    # The coordinator went away (a restart, say): reconnect for as
                    # long as a first connection would be given.
                    log.warning("client %s lost the coordinator; reconnecting", name)
                    deadline = time.monotonic() + options.connect_seconds
                    continue
                # The coordinator registers keys just after its SuperLink starts: a
                # refusal may only mean "not yet", until the connect timeout says otherwise.
                if REFUSAL_HINTS[0][0] in text and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                server.close()
                raise DeployError(_refusal(text, options))
