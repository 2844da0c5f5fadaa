"""``fedtrain server`` and ``fedtrain client``: a deployment on Flower's
SuperLink and SuperNodes, with everything Flower needs handled here.

The coordinator (``fedtrain server``) starts a SuperLink with TLS and
SuperNode authentication (:func:`superlink_main`), registers every
``client-N.pub`` of the certificate folder, writes a one-run Flower app
whose ``ServerApp`` is :data:`fedtrain.backends.flower.server_app`, submits
it with ``flwr run``, shows progress from the run folder's
``metrics.jsonl``, and reads the run's real status at the end (``flwr run``
exits 0 even when a run fails).

Ports. Flower 1.42 serves its Fleet API (SuperNodes), its Control API
(``flwr run / stop / ls``, ``flwr supernode register``) and its Runtime API
(ServerApps) on one HTTP port, the last two without any authentication:
whoever reaches that port can register a key, stop the run or submit an
app whose code every client then runs. So fedtrain serves Flower's
application on two listeners: ``--address`` (the clients' address) carries
the Fleet API alone, with TLS and SuperNode authentication; every other API
is on a port of ``127.0.0.1`` that only the coordinator's machine reaches,
where the coordinator's own ``flwr`` calls and Flower's SuperExec go.

A client (``fedtrain client``) starts its warm :class:`ClientWorker` and a
SuperNode (:func:`supernode_main`) whose ``ClientApp`` relays each message
to it. That SuperNode runs fedtrain's own app only (:func:`fab_refusal`),
and the worker builds only built-in models and data sets unless the
client's own command line allows a plug-in.

Every Flower program, flag, internal and log line fedtrain relies on is in
this module (the "Flower facts" below), checked against the tested Flower
releases (:data:`FLOWER_TESTED`). Flower's state (``FLWR_HOME``), logs and
app live in ``RUN_DIR/flower`` on the coordinator and in a temporary folder
on a client; telemetry is off and runtime dependency installation is
disabled (fedtrain is already installed). Besides
:mod:`fedtrain.backends.flower`, only the SuperLink and SuperNode entry
points here import ``flwr``, in their own processes.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Iterator, Mapping, Protocol, Sequence

from fedtrain.certs import CertificateSet
from fedtrain.config import Config, ConfigError, from_dict, to_dict
from fedtrain.relay import NODE_KEY_FILE, NODE_WORKER, ClientInfo, Hello

if TYPE_CHECKING:
    from fedtrain.client_worker import WorkerServer
    from fedtrain.secure.setting import SecureSettings

log = logging.getLogger(__name__)

REQUEST_FILE = "deploy.json"
FLOWER_DIR = "flower"
CONNECTION = "fedtrain"
DEFAULT_ADDRESS = "127.0.0.1:9092"
DEFAULT_TIMEOUT = 600.0
"""Seconds the coordinator waits for a client's update when
``client.timeout`` is 0 (no limit makes no sense once clients can vanish)."""

DEFAULT_POLL = 0.1
"""Seconds between a waiting party's requests (coordinator for replies,
SuperNode for messages, Flower's SuperExec for tasks). Flower's defaults
(3 s, 3 s, 1 s) cost seconds of latency per round; ``--poll 3`` restores them."""

FLOWER_IDLE_POLL = 3.0
"""Seconds Flower's SuperNode sleeps between asking for messages when idle
(hard-coded in ``flwr.supernode.start_client_internal``, 1.41 and 1.42)."""

FLOWER_SUPEREXEC_POLL = 1.0
"""Flower's default ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``."""

# ---------------------------------------------------------------- Flower facts

FLOWER_TESTED = ((1, 42), (1, 43))
"""Flower releases the deployment was tested with: ``>=1.42,<1.43``
(:data:`FLOWER_RANGE`). The SuperLink and SuperNode entry points build on
Flower internals that change between minor releases, so any other release
is refused before anything starts (:func:`check_flower_version`)."""

FLOWER_RANGE = ">=1.42,<1.43"

LOOPBACK = "127.0.0.1"

FLEET_PREFIX = "/v1/fleet/"
"""Flower 1.42 serves every API over HTTP on one port; the Fleet API's
routes are the ones under this prefix (``/v1/control/`` is the Control API,
``/v1/runtime/`` the Runtime API)."""

GRPC_API_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
"""Environment switches that make Flower 1.42's SuperLink also start its
legacy gRPC Control and Fleet servers on addresses of their own (the
Control API's default is ``0.0.0.0:9093``, unauthenticated): removed from
every environment fedtrain starts Flower in."""

NODE_JOINED = "SuperNode ID"
"""A SuperNode's log once the SuperLink accepted it (``SuperNode ID: N``)."""

ACTIVATION_REFUSED = "Failed to activate SuperNode"
"""A SuperNode's log when the SuperLink refused its key. Flower's error
(code 2004) does not say why: the key is not registered, or a SuperNode
with that key is connected already."""

ACTIVATION_LOG = re.compile(
    r"Attempted to register SuperNode with public key: b'(?P<key>[^']*)', exception: (?P<why>[^\n]*)"
)
"""The SuperLink's log line for a refused activation; ``key`` is the PEM
public key (escaped), ``why`` contains :data:`UNKNOWN_KEY` or matches
:data:`KEY_IN_USE`."""

UNKNOWN_KEY = "No SuperNode found with the given public key"
KEY_IN_USE = re.compile(r"SuperNode with node ID (?P<node>\d+) could not be activated")

NODE_HEARTBEAT_SECONDS = 10
"""Heartbeat interval fedtrain's SuperNodes announce: Flower's minimum (its
default is 30 s). The SuperLink holds a key for :data:`HEARTBEAT_PATIENCE`
intervals after its node's last heartbeat, so a client killed without a
clean stop frees its key within 20 s instead of 60 s, and a second client
with a connected key can be refused at once."""

HEARTBEAT_PATIENCE = 2
"""Flower's ``HEARTBEAT_PATIENCE``: heartbeat intervals a node stays online without one."""

KEY_HOLD_SECONDS = NODE_HEARTBEAT_SECONDS * HEARTBEAT_PATIENCE

REFUSAL_MARK = "fedtrain refused a connection:"
"""Start of the line the SuperLink entry point logs for each failed TLS
handshake on the Fleet address; the coordinator re-logs what follows."""

_OTHER_CA = (
    "a client does not trust this coordinator's certificate: its ca.pem is not the CA that signed "
    "--certs/server.pem (another deployment's certs?)"
)
TLS_REFUSALS = {
    "HTTP_REQUEST": "a client spoke plain text to this TLS address (fedtrain client --insecure)",
    "TLSV1_ALERT_UNKNOWN_CA": _OTHER_CA,
    "TLSV1_ALERT_DECRYPT_ERROR": _OTHER_CA,
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "a client rejected this coordinator's certificate: most likely it dialled a host name the "
        "certificate does not carry (fedtrain certs --hosts)"
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "a client rejected this coordinator's certificate as expired",
}
"""What a failed TLS handshake on the Fleet address means, by OpenSSL's
reason: the alert a client sends when it refuses the certificate, or the
plain-text request OpenSSL recognises."""

APP_COMPONENTS = {
    "serverapp": "fedtrain.backends.flower:server_app",
    "clientapp": "fedtrain.backends.flower:client_app",
}
"""The components of the one Flower app a fedtrain client runs (:data:`APP_PYPROJECT`)."""

FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
"""What the app bundle (FAB) that ``flwr run`` builds from fedtrain's app
folder holds: its ``pyproject.toml`` and Flower's manifest. No code: the
code is the fedtrain installed on each machine."""


def flower_version() -> str:
    """The installed ``flwr`` release."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        raise DeployError(f"flwr is not installed: pip install 'flwr{FLOWER_RANGE}'") from None


def check_flower_version() -> None:
    """Raise unless the installed Flower is one the deployment was tested with."""
    installed = flower_version()
    release = tuple(int(part) for part in re.findall(r"\d+", installed)[:2])
    low, high = FLOWER_TESTED
    if not low <= release < high:
        raise DeployError(
            f"flwr {installed} is installed; fedtrain's deployment is tested with flwr {FLOWER_RANGE} "
            f"(it drives Flower internals): pip install 'flwr{FLOWER_RANGE}'"
        )


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
    trust_checkpoint: bool = False
    authenticated: bool = False
    """Clients authenticate with registered keys: each client id is then
    bound to the key that first claimed it (:class:`RoundBackend`)."""

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
    ids_follow_keys: bool

    def wait_for_clients(self, expected: int, minimum: int, wait: float) -> list[str]: ...


def coordinate(
    request: DeployRequest, make_backend: Callable[[Hello, SecureDeployment | None], RoundBackend]
) -> None:
    """The coordinator's side of a deployed run, inside Flower's ServerApp:
    the same engine, strategy, privacy policy and run folder as a simulation.

    With ``secure.aggregation = true`` the backend is asked for secure
    aggregation (the clients mask their updates and the coordinator learns
    only their sum), after the strategy was checked to work on a sum alone.

    fedtrain's warnings from here on (clients joining, refusing the run,
    failing) reach the coordinator's console through :data:`SERVERAPP_LOG`."""
    with _serverapp_log(Path(request.run_dir)):
        _coordinate(request, make_backend)


def _coordinate(
    request: DeployRequest, make_backend: Callable[[Hello, SecureDeployment | None], RoundBackend]
) -> None:
    from fedtrain.client import LocalTrainer, resolve_device
    from fedtrain.engine import Engine, RngStreams
    from fedtrain.layout import ParamLayout
    from fedtrain.privacy.setting import build_policy
    from fedtrain.sampling import make_sampler, secret_sampling
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
    backend.ids_follow_keys = request.authenticated
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
        rngs=RngStreams.from_seed(config.run.seed, secret_cohort=secret_sampling(config.privacy)),
        privacy=privacy,
    )
    params = layout.flatten(model.state_dict()).to(device)
    run_engine(config, engine, layout, params, Path(request.run_dir), False, request.resume, started,
               request.trust_checkpoint)


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


def script_dirs() -> list[Path]:
    """Where this Python environment's console scripts are (``flwr``,
    ``flower-superexec``): its scripts folder, then the running interpreter's
    folder. Flower starts its helpers by bare name, so these go first on the
    ``PATH`` of every process fedtrain starts: a ``fedtrain`` run by its
    absolute path, with its environment not on ``PATH``, still finds them."""
    found = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    return list(dict.fromkeys(p for p in found if p.is_dir()))


def _flower_env(home: Path, poll_seconds: float = DEFAULT_POLL) -> dict[str, str]:
    """The environment of a Flower process: its own ``FLWR_HOME``, no
    telemetry or update check, this environment's scripts first on ``PATH``,
    and none of :data:`GRPC_API_SWITCHES`."""
    env = {k: v for k, v in os.environ.items() if k not in GRPC_API_SWITCHES}
    path = [*map(str, script_dirs()), *(p for p in env.get("PATH", "").split(os.pathsep) if p)]
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(min(poll_seconds, FLOWER_SUPEREXEC_POLL)),
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join(dict.fromkeys(path)),
    )
    return env


def _program(name: str) -> str:
    """Flower's console script ``name``, from this Python's environment when it is there."""
    for folder in script_dirs():
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: install Flower (pip install 'flwr{FLOWER_RANGE}')")
    return found


def _entry_point(command: str) -> list[str]:
    """The command line of this module's ``command`` (``superlink``, ``supernode``)."""
    return [sys.executable, "-m", "fedtrain.deploy", command]


def _check_positive(parameter: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{parameter} {value}: must be a positive number of seconds")


def split_address(address: str, parameter: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), with an error naming ``parameter``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{parameter} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        _check_positive("--wait", self.wait_seconds)
        _check_positive("--poll", self.poll_seconds)


def _connection_toml(control: str) -> str:
    """The coordinator's ``flwr`` connection: its SuperLink's Control API on
    loopback, plain text (that port is reachable from this machine only)."""
    return f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{control}"\ninsecure = true\n'


SERVERAPP_LOG = "serverapp.log"
"""``RUN_DIR/flower/serverapp.log``: the warnings of fedtrain's code inside
Flower's ServerApp process (clients joining, refusing the run, failing),
one JSON object a line, shown on the coordinator's console as they come."""


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return json.dumps({"level": record.levelno, "name": record.name, "message": text})


@contextlib.contextmanager
def _serverapp_log(run_dir: Path) -> Iterator[None]:
    """While inside, fedtrain's warnings in this (ServerApp) process also go
    to :data:`SERVERAPP_LOG`, where the coordinator's console picks them up:
    Flower keeps a ServerApp's own output to itself."""
    (run_dir / FLOWER_DIR).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / FLOWER_DIR / SERVERAPP_LOG, encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger("fedtrain")
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.WARNING:
        root.setLevel(logging.WARNING)
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


@dataclass
class _LogTail:
    """The lines appended to a file since the last call."""

    path: Path
    offset: int = 0
    partial: bytes = field(default=b"", repr=False)

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in complete]


def _watch_logs(link_log: Path, app_log: Path, key_names: Mapping[str, str], stop: threading.Event) -> None:
    """Show on the coordinator's console what it would otherwise never see:
    each connection the SuperLink refused, with its reason (once per reason
    and check, with a count), and the ServerApp's warnings."""
    link, app = _LogTail(link_log), _LogTail(app_log)
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


def serve(options: ServerOptions) -> dict[str, Any]:
    """Run a deployed coordinator to the end; the run's Flower status.

    The SuperLink (:func:`superlink_main`) first listens on loopback only;
    the clients' keys are registered there, then its Fleet API opens on
    ``--address``, and the run is submitted, again on loopback. The
    coordinator never dials its own ``--address``, so its certificate need
    only carry the names clients dial. Each connection the SuperLink refuses,
    and the ServerApp's warnings, are logged here as they come.

    Raises :class:`DeployError` with the reason when the run did not complete.
    """
    from fedtrain import __version__
    from fedtrain.results import METRICS_FILE

    host, port = split_address(options.address, "--address")
    check_flower_version()
    check_secure_deployment(options.config)
    if options.certs is None and not _is_loopback(host):
        raise ValueError(
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
    (home / "config.toml").write_text(_connection_toml(f"{LOOPBACK}:{control_port}"))
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
    args = [*_entry_point("superlink"), "--fleet", options.address, "--local-port", str(control_port),
            "--open-when", str(opened)]
    if certs is None:
        log.warning("--insecure: the SuperLink accepts plain-text connections from any client")
    else:
        args += ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                 "--ssl-ca-certfile", str(certs.ca)]
    link_log = flower / "superlink.log"
    stop = threading.Event()
    with Processes() as procs:
        link = procs.start(args, _flower_env(home, options.poll_seconds), link_log)
        _wait_listening(LOOPBACK, control_port, link, link_log, 30.0)
        if certs is not None:
            for key in certs.client_keys():
                _flwr(home, ["supernode", "register", str(key), CONNECTION])
        opened.touch()
        _wait_listening(_local_dial(host), port, link, link_log, 30.0)
        key_names = certs.client_key_pems() if certs is not None else {}
        watcher = threading.Thread(
            target=_watch_logs, args=(link_log, flower / SERVERAPP_LOG, key_names, stop), daemon=True
        )
        watcher.start()
        run_id = str(_flwr(home, ["run", str(app), CONNECTION])["run-id"])
        log.warning(
            "run %s submitted; clients dial %s:%d (Fleet API only; Control API on %s:%d); waiting for %d client(s)",
            run_id, host, port, LOOPBACK, control_port, expected,
        )
        try:
            status = _follow(home, run_id, run_dir / METRICS_FILE, options, link, link_log)
        finally:
            stop.set()
            watcher.join(5.0)
    if status.get("status") != "finished:completed":
        raise DeployError(
            f"run {run_id} ended {status.get('status')}: {status.get('status-details')}; "
            f"SuperLink log: {link_log}; ServerApp log: {flower / SERVERAPP_LOG}"
        )
    return status


OWN_LOG_LINE = re.compile(r"^(?P<level>WARNING|ERROR|CRITICAL) (?P<name>fedtrain[\w.]*): (?P<message>.*)$")
"""A warning of fedtrain's own code in a Flower process it started
(:func:`_log_to_stderr`'s format), e.g. a SuperNode refusing a foreign app."""


def _relog(line: str) -> None:
    """Show fedtrain's own warning ``line`` of a child's log on this process's console."""
    found = OWN_LOG_LINE.match(line)
    if found is not None:
        logging.getLogger(found["name"]).log(getattr(logging, found["level"]), "%s", found["message"])


def _local_dial(host: str) -> str:
    """Where this machine reaches a listener bound to ``host``."""
    return {"0.0.0.0": LOOPBACK, "::": "::1", "": LOOPBACK}.get(host, host)


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
    allow_plugins: tuple[str, ...] = ()
    """Plug-in names (``model.name`` / ``data.dataset``) this client may import."""

    def __post_init__(self) -> None:
        _check_positive("--connect-timeout", self.connect_seconds)
        _check_positive("--poll", self.poll_seconds)
        for name in self.allow_plugins:
            module, sep, attr = name.rpartition(":")
            if not sep or not module or not attr:
                raise ValueError(
                    f"--allow-plugin {name!r}: expected the name exactly as the run's config gives it, "
                    "'package.module:function' or 'path/to/file.py:function'"
                )


REFUSAL_HINTS = (
    (ACTIVATION_REFUSED, "the coordinator refused this client's key {pub}: either it is not registered there "
     "(the coordinator registers the client-N.pub of its --certs folder), or another client with this key is "
     f"connected right now (each client needs a key of its own; a client stopped without a clean exit holds "
     f"its key for up to {KEY_HOLD_SECONDS} s); the coordinator's log says which"),
    ("Hostname mismatch", "TLS verification of {server} failed: the coordinator's certificate does not carry "
     "the name {host} (make it with fedtrain certs --hosts naming every address clients dial)"),
    ("IP address mismatch", "TLS verification of {server} failed: the coordinator's certificate does not carry "
     "the name {host} (make it with fedtrain certs --hosts naming every address clients dial)"),
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
    check_flower_version()
    args = [*_entry_point("supernode"), "--poll", str(options.poll_seconds),
            "--superlink", options.server, "--max-wait-time", str(options.connect_seconds)]
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
    worker = ClientWorker(name, options.partition, options.data, options.device, options.allow_plugins)
    with tempfile.TemporaryDirectory(prefix="fedtrain-client-") as tmp:
        folder = Path(tmp)
        server = WorkerServer(worker, folder)
        try:
            return _serve_node(options, name, args, folder, server, stop)
        finally:
            server.close()


def _serve_node(
    options: ClientOptions, name: str, args: list[str], folder: Path, server: WorkerServer,
    stop: threading.Event | None,
) -> int:
    """Run the client's SuperNode (again after it lost a coordinator it had
    joined) until ``stop`` is set; :class:`DeployError` when it was refused.

    The coordinator opens its Fleet address only after registering its
    clients' keys, so a refused key is a refusal, never a "not yet"."""
    key_file = folder / "worker.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(server.authkey.hex())
    server.start()
    node_config = f'{NODE_WORKER}="{server.address}" {NODE_KEY_FILE}="{key_file}"'
    args = [*args, "--node-config", node_config, "--port", str(free_port())]
    node_log = folder / "supernode.log"
    with Processes() as procs:
        log.warning("client %s connecting to %s", name, options.server)
        while True:
            node_log.write_bytes(b"")
            node = procs.start(args, _flower_env(folder / "home", options.poll_seconds), node_log)
            tail = _LogTail(node_log)
            joined = False
            while True:
                running = node.poll() is None
                for line in tail.lines():
                    if not joined and NODE_JOINED in line:
                        joined = True
                        log.warning("client %s connected to %s", name, options.server)
                    _relog(line)
                if not running:
                    break
                if stop is not None and stop.is_set():
                    return 0
                time.sleep(0.2)
            if not joined:
                raise DeployError(_refusal(node_log.read_text(errors="replace"), options))
            log.warning("client %s lost the coordinator; reconnecting", name)


# ----------------------------------------------------- Flower's own processes


def fab_refusal(content: bytes) -> str | None:
    """Why a fedtrain client refuses the Flower app bundle (FAB) ``content``,
    or None when it is fedtrain's own run: a bundle of :data:`FAB_FILES`
    only (no code of its own, which ``flwr-clientapp`` would import ahead of
    the installed packages), whose components are :data:`APP_COMPONENTS`
    (the code is the fedtrain installed on the client) and which asks to
    install nothing. What a run may ask of a client is then decided by the
    client's fedtrain, whoever submitted the run."""
    import tomllib

    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        names = set(bundle.namelist())
        extra = sorted(names - FAB_FILES)
        if extra or "pyproject.toml" not in names:
            shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
            return f"the app bundle holds {shown or 'no pyproject.toml'}; fedtrain's run holds {sorted(FAB_FILES)} only"
        project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, OSError) as exc:
        return f"the app bundle does not read as a Flower app ({type(exc).__name__}: {exc})"
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if components != APP_COMPONENTS:
        return f"the app's components are {components!r}; fedtrain's run has {APP_COMPONENTS!r}"
    dependencies = project.get("project", {}).get("dependencies", [])
    if dependencies:
        return f"the app asks to install {dependencies!r}; fedtrain's run installs nothing"
    return None


class _ObservedHandshake(ssl.SSLObject):
    """The TLS session of one connection to the Fleet address; a handshake
    that fails is logged with what it means (:data:`TLS_REFUSALS`), which
    Python's event loops only do in debug mode."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            reason = TLS_REFUSALS.get(str(exc.reason), f"a TLS handshake failed ({exc.reason or exc})")
            log.warning("%s %s", REFUSAL_MARK, reason)
            raise


class FleetOnly:
    """An ASGI application that passes the requests for ``paths`` (the Fleet
    API's routes) to ``app`` and answers anything else with 404, so that the
    clients' address serves no other Flower API."""

    def __init__(self, app: Any, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            body = b'{"detail":"Not Found: this address serves the Fleet API only"}'
            await send({"type": "http.response.start", "status": 404, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            ]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})


def superlink_main(argv: Sequence[str]) -> None:
    """``python -m fedtrain.deploy superlink``: Flower's SuperLink, its APIs
    split over two listeners (see the module's "Ports").

    The application is Flower's own, built by Flower's argument parser,
    lifespan (which starts the SuperExec) and routes; it is served:

    - on ``127.0.0.1:--local-port``, plain HTTP, every API: the coordinator's
      ``flwr`` calls, Flower's SuperExec and the ServerApp reach it there;
    - on ``--fleet`` (the clients' address), with TLS and SuperNode
      authentication unless no certificate is given: the Fleet API only. It
      opens once ``--open-when`` exists, which the coordinator creates after
      registering its clients' keys, so that a refused key is a refusal.

    Each TLS handshake that fails on the Fleet address is logged with its
    reason (:data:`REFUSAL_MARK`)."""
    import argparse
    import asyncio
    import importlib

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m fedtrain.deploy superlink", description=superlink_main.__doc__)
    parser.add_argument("--fleet", required=True, help="HOST:PORT the clients dial")
    parser.add_argument("--local-port", type=int, required=True, help="loopback port of every other API")
    parser.add_argument("--open-when", type=Path, help="open the Fleet address once this file exists")
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--ssl-ca-certfile")
    ns = parser.parse_args(argv)
    tls = [ns.ssl_certfile, ns.ssl_keyfile, ns.ssl_ca_certfile]
    if any(tls) and not all(tls):
        raise DeployError("--ssl-certfile, --ssl-keyfile and --ssl-ca-certfile go together (or none: plain text)")
    host, port = split_address(ns.fleet, "--fleet")
    check_flower_version()
    for switch in GRPC_API_SWITCHES:
        os.environ.pop(switch, None)

    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app
    from flwr.superlink.routers.fleet.router import router as fleet_router

    flower_args = ["--host", LOOPBACK, "--port", str(ns.local_port), "--disable-runtime-dependency-installation"]
    if all(tls):
        flower_args += ["--ssl-certfile", ns.ssl_certfile, "--ssl-keyfile", ns.ssl_keyfile,
                        "--ssl-ca-certfile", ns.ssl_ca_certfile, "--enable-supernode-auth"]
    else:
        flower_args.append("--insecure")
    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    parse = getattr(flower_superlink, "_parse_superlink_lifespan_config", None)
    lifespan = getattr(flower_superlink, "SuperLinkLifespan", None)
    if not callable(parse) or lifespan is None:
        raise DeployError(f"flwr {flower_version()}: its SuperLink cannot be built with separate listeners; "
                          f"tested with flwr {FLOWER_RANGE}")
    sys.argv = ["flower-superlink", *flower_args]
    config = parse()
    local = replace(config, insecure=True, certificates=None, ssl_ca_certfile=None, ssl_certfile=None,
                    ssl_keyfile=None)
    app = create_app(local, lifespan)
    fleet_paths = {getattr(route, "path") for route in fleet_router.routes}
    if not fleet_paths or not all(p.startswith(FLEET_PREFIX) for p in fleet_paths):
        raise DeployError(f"flwr {flower_version()}: its Fleet API routes are {sorted(fleet_paths)}, not under "
                          f"{FLEET_PREFIX}; tested with flwr {FLOWER_RANGE}")
    common: dict[str, Any] = dict(
        log_config=get_uvicorn_log_config(console_handler.level), access_log=False, proxy_headers=False,
        server_header=False, timeout_graceful_shutdown=5,
    )
    servers = [
        uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=ns.local_port, **common)),
        uvicorn.Server(uvicorn.Config(
            FleetOnly(app, fleet_paths), host=host, port=port, lifespan="off",
            ssl_certfile=ns.ssl_certfile, ssl_keyfile=ns.ssl_keyfile, **common,
        )),
    ]
    local_server, fleet_server = servers
    fleet_server.config.load()
    if fleet_server.config.ssl is not None:
        fleet_server.config.ssl.sslobject_class = _ObservedHandshake

    def stop(signum: int, frame: object) -> None:
        for server in servers:
            server.should_exit = True

    for server in servers:
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    async def serve() -> None:
        tasks = [asyncio.create_task(local_server.serve())]
        while not (tasks[0].done() or local_server.should_exit):
            if local_server.started and (ns.open_when is None or ns.open_when.exists()):
                tasks.append(asyncio.create_task(fleet_server.serve()))
                break
            await asyncio.sleep(0.05)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop(signal.SIGTERM, None)
        await asyncio.gather(*tasks)

    log.warning("SuperLink: Fleet API on %s:%d, every other API on %s:%d", host, port, LOOPBACK, ns.local_port)
    loop_factory = getattr(local_server.config, "get_loop_factory", lambda: None)()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())


def _guard_apps() -> None:
    """Make this SuperNode run fedtrain's own app only.

    Flower 1.42 checks apps against trusted publishers (``--trusted-entities``)
    only for apps signed on Flower Hub: the signatures come from the Hub, and
    the open-source SuperLink marks every other app unverifiable. fedtrain
    takes that check's place: each app bundle is marked checkable and judged
    by :func:`fab_refusal`. A refused app gets Flower's own verification
    error as its reply (with the reason), and is never installed or run."""
    import inspect

    from flwr.app import Error
    from flwr.supernode import start_client_internal as node

    pull = getattr(node, "_pull_and_store_message", None)
    verify = getattr(node, "_verify_fab", None)
    error = getattr(node, "FAB_VERIFICATION_ERROR", None)
    parameters = set(inspect.signature(pull).parameters) if callable(pull) else set()
    if not callable(verify) or not isinstance(error, Error) or not {"get_fab", "trusted_entities"} <= parameters:
        raise DeployError(
            f"flwr {flower_version()}: its SuperNode has no app check fedtrain can hold to its own app; "
            f"tested with flwr {FLOWER_RANGE}"
        )

    def pull_checked(**kwargs: Any) -> Any:
        fetch = kwargs["get_fab"]

        def get_fab(fab_hash: str, run_id: int) -> Any:
            fab = fetch(fab_hash, run_id)
            fab.verifications = {**fab.verifications, "valid_license": "fedtrain"}
            return fab

        return pull(**{**kwargs, "get_fab": get_fab, "trusted_entities": {"fedtrain": "fab_refusal"}})

    def judge(fab: Any, trusted: object) -> bool:
        reason = fab_refusal(fab.content)
        if reason is None:
            return True
        log.error("refused a Flower app that is not fedtrain's run: %s", reason)
        node.FAB_VERIFICATION_ERROR = Error(error.code, f"the fedtrain client refused this app: {reason}")
        return False

    node._pull_and_store_message = pull_checked
    node._verify_fab = judge


def _announce_heartbeat(seconds: int) -> None:
    """Make this SuperNode announce (and keep) a heartbeat every ``seconds``."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (heartbeat, fleet_http_connection):
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise DeployError(f"flwr {flower_version()}: {module.__name__} has no heartbeat interval to set; "
                              f"tested with flwr {FLOWER_RANGE}")
        setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", seconds)


def supernode_main(argv: Sequence[str]) -> None:
    """``python -m fedtrain.deploy supernode --poll S ARGS``: ``flower-supernode
    ARGS`` that runs fedtrain's own app only (:func:`_guard_apps`), announces
    a heartbeat every :data:`NODE_HEARTBEAT_SECONDS`, and polls for messages
    every ``S`` seconds when idle
    (:func:`fedtrain.backends.flower.run_supernode`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedtrain.deploy supernode", add_help=False, allow_abbrev=False)
    parser.add_argument("--poll", type=float, required=True)
    known, rest = parser.parse_known_args(argv)
    _check_positive("--poll", known.poll)
    check_flower_version()
    _guard_apps()
    _announce_heartbeat(NODE_HEARTBEAT_SECONDS)
    from fedtrain.backends.flower import run_supernode

    run_supernode(known.poll, rest)


ENTRY_POINTS: dict[str, Callable[[Sequence[str]], None]] = {
    "superlink": superlink_main,
    "supernode": supernode_main,
}


def _log_to_stderr() -> None:
    """fedtrain's warnings to stderr, leaving Flower's own logging (which has
    its handlers and levels) alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedtrain")
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    root.propagate = False


if __name__ == "__main__":
    log = logging.getLogger("fedtrain.deploy")
    _log_to_stderr()
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in ENTRY_POINTS:
        sys.exit(f"python -m fedtrain.deploy {command!r}: allowed commands: {', '.join(ENTRY_POINTS)}")
    try:
        ENTRY_POINTS[command](sys.argv[2:])
    except DeployError as exc:
        sys.exit(f"fedtrain: error: {exc}")
