"""Flower's helper processes forked from a warm process instead of started cold.

Flower 1.42 starts its helpers as fresh programs found on ``PATH``: each
SuperNode and SuperLink starts a ``flower-superexec``, and a SuperNode's
SuperExec starts a fresh ``flwr-clientapp`` for every message (a
long-lived ClientApp is Flower's open issue #3670). Each of them spends
nearly all its CPU importing Flower before it does anything, so on a small
federation those start-ups are most of what a deployment costs: more than
a CPU-second per helper, and per client and message for the ClientApp.

:func:`start_warm_programs` runs in the SuperNode's (or SuperLink's)
process before Flower starts any thread: it imports the helpers' entry
points once (:class:`WarmProgram`), forks a *warm starter* (:func:`_serve`)
and puts a tiny launcher for each helper first on the ``PATH`` that Flower
then starts them through. For each start the launcher (the standard library
only, started with ``-IS``) hands its program's name, its arguments and its
standard streams to the warm starter over a Unix socket; the starter forks
a child that runs Flower's own entry point with them, and answers the
launcher with the child's exit status. What runs is exactly Flower's
program, started warm: same arguments, streams and exit status; the
environment is the one its SuperNode or SuperLink started with, with the
launchers first on ``PATH`` (so a warm SuperExec's ClientApps start warm
too); a launcher that is killed takes its child with it.

The socket is in Linux's abstract namespace under a random name, and the
starter serves only peers of its own user (``SO_PEERCRED``): whoever could
use it could already run Flower's programs themselves. When the starter
cannot be reached, the launcher runs Flower's own program.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

from fedtrain.deploy.errors import DeployError
from fedtrain.deploy.flower import program
from fedtrain.deploy.processes import die_with_parent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmProgram:
    """One of Flower's helper programs, started warm."""

    name: str
    """The program Flower starts through ``PATH``."""
    entry: tuple[str, str]
    """Module and function of its console script."""
    imports: tuple[str, ...] = ()
    """Modules its runs import, imported once by the warm starter."""


CLIENTAPP = WarmProgram(
    "flwr-clientapp", ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    ("fedtrain.transport.flower_client_app",),
)
"""A SuperNode's ClientApp, one per message; the imports are the ClientApp
that fedtrain's app bundle names."""

SUPEREXEC = WarmProgram("flower-superexec", ("flwr.supercore.cli", "flower_superexec"))
"""The SuperExec that a SuperNode or SuperLink starts once, which starts its apps."""

LAUNCHER_DIR = "fedtrain-bin"
"""Folder of the launchers, inside the SuperNode's or SuperLink's own ``FLWR_HOME``."""

MAX_REQUEST_BYTES = 1 << 16
"""Longest argument list a launcher may hand over (Flower's run a few hundred bytes)."""

_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!i")

LAUNCHER = """\
#!{python} -IS
import os, socket, struct, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({name!r})
except OSError:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
data = "\\0".join([{program!r}, *sys.argv[1:]]).encode()
socket.send_fds(s, [struct.pack("!I", len(data)) + data], [0, 1, 2])
answer = b""
while len(answer) < 4:
    chunk = s.recv(4 - len(answer))
    if not chunk:
        sys.exit(1)
    answer += chunk
sys.exit(struct.unpack("!i", answer)[0])
"""
"""The launcher named ``program`` that Flower finds first on ``PATH``:
``name`` is the warm starter's socket, ``real`` Flower's own program (run
instead when the starter cannot be reached)."""


def start_warm_programs(
    home: Path, programs: Sequence[WarmProgram], locate: Callable[[str], str] = program
) -> bool:
    """Fork the warm starter of ``programs`` and put their launchers first
    on this process's ``PATH`` (which Flower's processes, started later,
    inherit), in ``home``; ``locate`` finds Flower's own program of a name,
    which a launcher runs when the starter is gone. Call it before Flower
    starts a thread: False, and Flower's cold starts, when another thread
    runs already or an entry point cannot be imported."""
    try:
        entries = {p.name: getattr(importlib.import_module(p.entry[0]), p.entry[1]) for p in programs}
        reals = {p.name: locate(p.name) for p in programs}
        for p in programs:
            for name in p.imports:
                importlib.import_module(name)
    except (ImportError, AttributeError, DeployError) as exc:
        log.warning("Flower's helper programs start cold: %s", exc)
        return False
    if threading.active_count() != 1:
        log.warning("Flower's helper programs start cold: %d threads run already, and a fork would copy none of them",
                    threading.active_count())
        return False
    name = f"\0fedtrain-warm-{secrets.token_hex(16)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(64)
    launcher_dir = home / LAUNCHER_DIR
    launcher_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in programs:
        launcher = launcher_dir / p.name
        launcher.write_text(LAUNCHER.format(python=sys.executable, name=name, real=reals[p.name], program=p.name))
        launcher.chmod(0o700)
    os.environ["PATH"] = os.pathsep.join([str(launcher_dir), os.environ.get("PATH", "")])
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    if os.fork() == 0:
        _serve(listener, entries, reals, parent)
    listener.close()
    return True


def _serve(
    listener: socket.socket, entries: Mapping[str, object], reals: Mapping[str, str], parent: int
) -> NoReturn:
    """The warm starter: for each launcher that connects, fork a child that
    runs its program's entry point (``entries``, by program name) with the
    launcher's arguments and streams; answer the launcher with the child's
    exit status, and end a child whose launcher went away. Ends with the
    SuperNode or SuperLink that forked it (``parent``)."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent(parent)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        children: dict[int, socket.socket] = {}
        while True:
            for key, _ in selector.select(0.05):
                if key.fileobj is listener:
                    started = _accept(listener, selector, entries, reals, os.getpid())
                    if started is not None:
                        children[started[0]] = started[1]
                        selector.register(started[1], selectors.EVENT_READ)
                else:
                    conn = key.fileobj
                    gone = not _peek(conn)  # type: ignore[arg-type]
                    pid = next((p for p, c in children.items() if c is conn), None)
                    if gone and pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGTERM)
                        selector.unregister(conn)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is None:
                    continue
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(conn)
                conn.close()
    except BaseException:  # the starter must never run the SuperNode's code after the fork
        code = 1
    finally:
        os._exit(code)


def _peek(conn: socket.socket) -> bool:
    """Whether ``conn`` is still open (a launcher sends nothing after its request)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _accept(
    listener: socket.socket, selector: selectors.BaseSelector, entries: Mapping[str, object],
    reals: Mapping[str, str], starter: int,
) -> tuple[int, socket.socket] | None:
    """Take one launcher's request and fork its program; (child pid,
    connection), or None for a peer of another user, a program the starter
    does not serve or a malformed request."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            raise ConnectionRefusedError(f"a peer of uid {uid}")
        conn.settimeout(5.0)
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST_BYTES + _LENGTH.size, 3)
        if len(data) < _LENGTH.size or len(fds) != 3:
            raise ConnectionRefusedError("a malformed request")
        (length,) = _LENGTH.unpack_from(data)
        if length > MAX_REQUEST_BYTES:
            raise ConnectionRefusedError(f"a request of {length} bytes")
        body = data[_LENGTH.size:]
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ConnectionRefusedError("a truncated request")
            body += chunk
        program, *args = body.decode().split("\0")
        if program not in entries:
            raise ConnectionRefusedError(f"a request for {program!r}")
    except (OSError, ValueError, UnicodeDecodeError):
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        _run_child(listener, selector, conn, fds, entries[program], reals[program], args, starter)
    for fd in fds:
        os.close(fd)
    return pid, conn


def _run_child(
    listener: socket.socket, selector: selectors.BaseSelector, conn: socket.socket, fds: Sequence[int],
    entry: object, real: str, args: list[str], starter: int,
) -> NoReturn:
    """In the forked child: become Flower's program ``real ARGS`` (its entry
    point ``entry``) on the launcher's streams, and exit with its status."""
    code = 1
    try:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        listener.close()
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(starter)
        sys.argv = [real, *args]
        try:
            entry()  # type: ignore[operator]
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
