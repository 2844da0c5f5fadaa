"""Everything fedtrain knows about Flower's programs, in one version-checked
place.

The deployment drives Flower 1.42's SuperLink and SuperNode, partly through
internals that change between minor releases: every Flower program name,
command-line flag, environment variable, internal and log-line pattern
fedtrain relies on is defined here, and the installed release is checked
against the tested ones (:data:`FLOWER_TESTED`, :func:`check_flower_version`)
before anything starts. Where an internal is missing, the entry point that
needs it refuses to start (:class:`~fedtrain.deploy.errors.DeployError`)
rather than run without a protection.

What fedtrain changes in Flower's processes, and why:

- the SuperLink's application is built here from Flower's own argument
  parser, lifespan and routes (:func:`superlink_app`), so that
  :mod:`fedtrain.deploy.superlink` can serve its Fleet API alone on the
  clients' address and every other API on loopback;
- a SuperNode runs fedtrain's own app only (:func:`guard_apps`, judged by
  :func:`fedtrain.deploy.app.fab_refusal`), announces a short heartbeat
  (:func:`announce_heartbeat`) and polls every ``--poll`` seconds while
  messages come, backing off to a second while none do (:class:`IdlePoll`,
  :func:`run_supernode`);
- the SuperLink's SuperExec asks for its one task per run (the ServerApp)
  every :data:`SUPERLINK_TASK_POLL` seconds, not at ``--poll``;
- the ServerApp gives up on a reply whose upload stopped after the
  deployment's per-client timeout instead of Flower's 180 s and more
  (:func:`bound_reply_pulls`);
- every Flower process gets its own ``FLWR_HOME``, no telemetry or update
  check, and none of the switches that would open Flower's legacy gRPC
  servers (:func:`flower_env`).

Flower's internals are imported inside the functions that patch or build
Flower's processes, which run in the SuperLink's or SuperNode's own process
(:mod:`fedtrain.deploy.superlink`, :mod:`fedtrain.deploy.supernode`). The
one other module that touches Flower internals is
:mod:`fedtrain.deploy.control`: the coordinator's Control API calls, made
with Flower's own CLI client, app-bundle builder and error handler; it runs
:func:`check_flower_version` before it imports any of them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from fedtrain.deploy.addresses import LOOPBACK
from fedtrain.deploy.errors import DeployError
from fedtrain.transport.relay import DEFAULT_POLL

log = logging.getLogger(__name__)

FLOWER_TESTED = ((1, 42), (1, 43))
"""Flower releases the deployment was tested with: ``>=1.42,<1.43``
(:data:`FLOWER_RANGE`). The SuperLink and SuperNode entry points build on
Flower internals that change between minor releases, so any other release
is refused before anything starts (:func:`check_flower_version`)."""

FLOWER_RANGE = ">=1.42,<1.43"

FLOWER_IDLE_POLL = 3.0
"""Seconds Flower's SuperNode sleeps between asking for messages when idle
(hard-coded in ``flwr.supernode.start_client_internal``, 1.41 and 1.42)."""

FLOWER_SUPEREXEC_POLL = 1.0
"""Flower's default ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``."""

SUPERLINK_TASK_POLL = FLOWER_SUPEREXEC_POLL
"""Seconds between the SuperLink's SuperExec's requests for a task. It has
one task per run, starting the ServerApp, so Flower's default costs a run's
start at most a second, where ``--poll`` would have the SuperLink answer
ten requests a second for as long as the run lasts (measured: more than
doubling an idle SuperLink's CPU)."""

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

TASK_FINISHED = re.compile(r"Finished task \d+ of run (?P<run>\d+)")
"""The SuperLink's log line once a run's ServerApp process ended, completed
or failed (``flwr.superlink.servicer.runtime.runtime_handlers``): the
coordinator then asks for the run's status at once instead of polling it."""

STATUS_POLL_SECONDS = 5.0
"""Longest interval between the coordinator's status checks
(:meth:`fedtrain.deploy.control.ControlClient.status`) while the SuperLink
has not logged the run's end."""

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

FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
"""What the app bundle (FAB) that Flower builds from fedtrain's app
folder holds: its ``pyproject.toml`` and Flower's manifest. No code: the
code is the fedtrain installed on each machine."""

CONNECTION = "fedtrain"
"""The name of the coordinator's ``flwr`` connection (:func:`connection_toml`)."""


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


def _untested(what: str) -> DeployError:
    return DeployError(f"flwr {flower_version()}: {what}; tested with flwr {FLOWER_RANGE}")


# ------------------------------------------------------- programs and flags


def script_dirs() -> list[Path]:
    """Where this Python environment's console scripts are (``flwr``,
    ``flower-superexec``): its scripts folder, then the running interpreter's
    folder. Flower starts its helpers by bare name, so these go first on the
    ``PATH`` of every process fedtrain starts: a ``fedtrain`` run by its
    absolute path, with its environment not on ``PATH``, still finds them."""
    found = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    return list(dict.fromkeys(p for p in found if p.is_dir()))


def flower_env(home: Path, poll_seconds: float = DEFAULT_POLL) -> dict[str, str]:
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


def program(name: str) -> str:
    """Flower's console script ``name``, from this Python's environment when it is there."""
    for folder in script_dirs():
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: install Flower (pip install 'flwr{FLOWER_RANGE}')")
    return found


def connection_toml(control: str) -> str:
    """The coordinator's ``flwr`` connection (``FLWR_HOME/config.toml``): its
    SuperLink's Control API on loopback, plain text (that port is reachable
    from this machine only). The coordinator calls that API in process
    (:mod:`fedtrain.deploy.control`); the connection lets a person look at
    the run with ``flwr ls`` while it runs."""
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{control}"\ninsecure = true\n')


def supernode_args(server: str, connect_seconds: float) -> list[str]:
    """``flower-supernode``'s flags for a SuperNode that dials ``server`` and
    gives up after ``connect_seconds`` without a SuperLink."""
    return ["--superlink", server, "--max-wait-time", str(connect_seconds)]


def supernode_tls_args(tls: tuple[Path, Path] | None) -> list[str]:
    """``flower-supernode``'s flags for TLS and SuperNode authentication with
    ``tls`` (the CA certificate, the client's private key), or for plain
    text when ``tls`` is None."""
    if tls is None:
        return ["--insecure"]
    ca, key = tls
    return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def supernode_node_args(node_config: str, port: int) -> list[str]:
    """``flower-supernode``'s flags for its ``--node-config`` and the port of
    its ClientApp API (one per SuperNode on a machine)."""
    return ["--node-config", node_config, "--port", str(port)]


# ---------------------------------------------------------------- SuperLink


@dataclass(frozen=True)
class SuperLinkApp:
    """Flower's SuperLink as an ASGI application, ready to be served."""

    app: Any
    """Every API, plain HTTP (fedtrain serves it on loopback only)."""
    fleet_paths: frozenset[str]
    """The routes of the Fleet API, all under :data:`FLEET_PREFIX`."""
    log_config: dict[str, Any]
    """uvicorn's log configuration as Flower's own SuperLink sets it."""


def superlink_app(local_port: int, tls: tuple[str, str, str] | None) -> SuperLinkApp:
    """Flower's own SuperLink application: built by Flower's argument parser,
    lifespan (which starts the SuperExec) and routes, for ``127.0.0.1:local_port``
    and, when ``tls`` (certificate, key, CA) is given, with SuperNode
    authentication. The application itself is built plain: the caller adds
    TLS where it serves the Fleet API."""
    import importlib

    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app
    from flwr.superlink.routers.fleet.router import router as fleet_router

    flower_args = ["--host", LOOPBACK, "--port", str(local_port), "--disable-runtime-dependency-installation"]
    if tls is not None:
        certfile, keyfile, ca_certfile = tls
        flower_args += ["--ssl-certfile", certfile, "--ssl-keyfile", keyfile,
                        "--ssl-ca-certfile", ca_certfile, "--enable-supernode-auth"]
    else:
        flower_args.append("--insecure")
    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    parse = getattr(flower_superlink, "_parse_superlink_lifespan_config", None)
    lifespan = getattr(flower_superlink, "SuperLinkLifespan", None)
    if not callable(parse) or lifespan is None:
        raise _untested("its SuperLink cannot be built with separate listeners")
    sys.argv = ["flower-superlink", *flower_args]
    config = parse()
    local = replace(config, insecure=True, certificates=None, ssl_ca_certfile=None, ssl_certfile=None,
                    ssl_keyfile=None)
    app = create_app(local, lifespan)
    fleet_paths = frozenset(getattr(route, "path") for route in fleet_router.routes)
    if not fleet_paths or not all(p.startswith(FLEET_PREFIX) for p in fleet_paths):
        raise _untested(f"its Fleet API routes are {sorted(fleet_paths)}, not under {FLEET_PREFIX}")
    return SuperLinkApp(app, fleet_paths, get_uvicorn_log_config(console_handler.level))


# ---------------------------------------------------------------- SuperNode


def guard_apps(refusal: Callable[[bytes], str | None]) -> None:
    """Make this SuperNode run only the app bundles that ``refusal`` finds
    nothing against (:func:`fedtrain.deploy.app.fab_refusal`).

    Flower 1.42 checks apps against trusted publishers (``--trusted-entities``)
    only for apps signed on Flower Hub: the signatures come from the Hub, and
    the open-source SuperLink marks every other app unverifiable. fedtrain
    takes that check's place: each app bundle is marked checkable and judged
    by ``refusal``. A refused app gets Flower's own verification error as its
    reply (with the reason), and is never installed or run."""
    import inspect

    from flwr.app import Error
    from flwr.supernode import start_client_internal as node

    pull = getattr(node, "_pull_and_store_message", None)
    verify = getattr(node, "_verify_fab", None)
    error = getattr(node, "FAB_VERIFICATION_ERROR", None)
    parameters = set(inspect.signature(pull).parameters) if callable(pull) else set()
    if not callable(verify) or not isinstance(error, Error) or not {"get_fab", "trusted_entities"} <= parameters:
        raise _untested("its SuperNode has no app check fedtrain can hold to its own app")

    def pull_checked(**kwargs: Any) -> Any:
        fetch = kwargs["get_fab"]

        def get_fab(fab_hash: str, run_id: int) -> Any:
            fab = fetch(fab_hash, run_id)
            fab.verifications = {**fab.verifications, "valid_license": "fedtrain"}
            return fab

        return pull(**{**kwargs, "get_fab": get_fab, "trusted_entities": {"fedtrain": "fab_refusal"}})

    def judge(fab: Any, trusted: object) -> bool:
        reason = refusal(fab.content)
        if reason is None:
            return True
        log.error("refused a Flower app that is not fedtrain's run: %s", reason)
        node.FAB_VERIFICATION_ERROR = Error(error.code, f"the fedtrain client refused this app: {reason}")
        return False

    node._pull_and_store_message = pull_checked
    node._verify_fab = judge


def announce_heartbeat(seconds: int) -> None:
    """Make this SuperNode announce (and keep) a heartbeat every ``seconds``."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (heartbeat, fleet_http_connection):
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise _untested(f"{module.__name__} has no heartbeat interval to set")
        setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", seconds)


IDLE_SHARE = 0.25
"""While no message comes, a SuperNode waits this share of the time since its
last message before it asks its SuperLink again (never less than ``--poll``,
never more than :data:`IDLE_POLL_MAX`): a message that comes after a quiet
spell waits at most a quarter as long again, and an idle federation does not
keep its SuperLink answering ten empty requests a second per client."""

IDLE_POLL_MAX = 1.0
"""Longest wait between an idle SuperNode's requests (Flower's is
:data:`FLOWER_IDLE_POLL`), unless ``--poll`` asks for a longer one."""


class IdlePoll:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the
    same functions, but its sleeps are fedtrain's.

    Flower's loop sleeps :data:`FLOWER_IDLE_POLL` seconds after each request
    that found no message, and half a second at a time while it waits for
    its ClientApp's reply. Here a wait for a reply lasts at most
    ``fastest`` (``--poll``); an idle wait lasts :data:`IDLE_SHARE` of the
    seconds since the SuperNode last had work (:meth:`worked`), between
    ``fastest`` and ``max(slowest, fastest)``.
    """

    def __init__(
        self, fastest: float, slowest: float = IDLE_POLL_MAX,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.fastest, self.slowest = fastest, max(slowest, fastest)
        self._clock, self._sleep = clock, sleep
        self._worked_at = clock()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def worked(self) -> None:
        """The SuperNode just took a message or sent a reply."""
        self._worked_at = self._clock()

    def idle_wait(self) -> float:
        """Seconds to wait before the next request for a message."""
        return min(max(self.fastest, IDLE_SHARE * (self._clock() - self._worked_at)), self.slowest)

    def sleep(self, seconds: float) -> None:
        self._sleep(self.idle_wait() if seconds >= FLOWER_IDLE_POLL else min(seconds, self.fastest))


def _noting_work(step: Callable[..., Any], poll: IdlePoll, found: Callable[[Any], bool]) -> Callable[..., Any]:
    """``step``, which tells ``poll`` when it did some work (``found`` of its result)."""

    def noted(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        if found(result):
            poll.worked()
        return result

    return noted


def bound_reply_pulls(seconds: float) -> None:
    """Make this process's ServerApp grid give up on a reply whose objects
    have not all arrived within ``seconds``.

    Flower 1.42's SuperLink hands the ServerApp a reply as soon as its
    sender pushed the message, before the message's objects (the model's
    chunks); the grid then waits for them up to ``PULL_MAX_TIME`` (2 h), in
    practice until the SuperLink drops the sender's push session
    (``OBJECT_PUSH_SESSION_TTL_SECONDS``, 180 s). A client that dies, or
    stops on purpose, in the middle of an upload would hold every other
    client's reply that long, since one pull fetches them all. Bounded, the
    reply becomes Flower's ``MESSAGE_UNAVAILABLE`` error, which the transport
    records as that client's failure: ``seconds`` is the deployment's
    per-client timeout, which a reply could not beat anyway.
    """
    from flwr.superlink.grid import http_grid

    pull = getattr(http_grid, "pull_objects", None)
    if not callable(pull) or "max_time" not in inspect.signature(pull).parameters:
        raise _untested("flwr.superlink.grid.http_grid has no pull_objects(max_time=...) to bound")
    http_grid.pull_objects = functools.partial(pull, max_time=seconds)


def pace_supernode_loop(loop: Any, poll_seconds: float) -> IdlePoll | None:
    """Make the SuperNode loop of module ``loop`` (Flower's
    ``flwr.supernode.start_client_internal``) wait as an :class:`IdlePoll`
    of ``poll_seconds`` decides, told of the work its pull and push steps
    do; None, and the module untouched, where it lacks any of them."""
    steps = ("_pull_and_store_message", "_push_messages")
    if not isinstance(getattr(loop, "time", None), type(time)) or not all(callable(getattr(loop, s, None)) for s in steps):
        return None
    poll = IdlePoll(poll_seconds)
    loop.time = poll
    loop._pull_and_store_message = _noting_work(loop._pull_and_store_message, poll, lambda run: run is not None)
    loop._push_messages = _noting_work(loop._push_messages, poll, lambda _: True)
    return poll


def run_supernode(poll_seconds: float, argv: Sequence[str]) -> None:
    """``flower-supernode ARGV``, whose loop waits between requests for
    messages as :class:`IdlePoll` decides instead of
    :data:`FLOWER_IDLE_POLL` seconds each time: ``poll_seconds`` while
    messages come, backing off to :data:`IDLE_POLL_MAX` while none do
    (:func:`pace_supernode_loop`).

    Flower offers no setting for this poll, which dominates a round's latency
    on a small federation, while every request costs the SuperLink CPU (a
    signature check where nodes authenticate, a look-up of the node's
    messages). Should a Flower release move the
    loop, the SuperNode runs with Flower's own poll and a warning says so.
    """
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if pace_supernode_loop(start_client_internal, poll_seconds) is None:
        log.warning("this Flower release has no SuperNode poll to shorten; polling every %g s", FLOWER_IDLE_POLL)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
