"""Supervision of the processes a deployment starts (a SuperLink on the
coordinator, a SuperNode on a client), and what fedtrain reads of their logs.

Nothing started here outlives the fedtrain process that started it: each
child runs in its own session and is told by Linux to end when its parent
dies, even by SIGKILL (:class:`Processes`); stopping one ends everything it
started too (Flower's SuperExec starts ServerApps and ClientApps in sessions
of their own), read from ``/proc``.

fedtrain's own code inside those processes logs in one format
(:func:`log_to_stderr`); the parent re-logs those lines on its console as
they come (:data:`OWN_LOG_LINE`, :func:`relog`), so a client sees, say, its
SuperNode refusing a foreign app.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from fedtrain.deploy.errors import DeployError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1

ENTRY_MODULE = "fedtrain.deploy"
"""The module whose ``__main__`` starts the deployment's Flower processes."""

OWN_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
"""How fedtrain's code logs in a process the deployment started (:func:`log_to_stderr`)."""

OWN_LOG_LINE = re.compile(r"^(?P<level>INFO|WARNING|ERROR|CRITICAL) (?P<name>fedtrain[\w.]*): (?P<message>.*)$")
"""A line of fedtrain's own code in a Flower process it started
(:data:`OWN_LOG_FORMAT`), e.g. a SuperNode refusing a foreign app; Flower's
own lines (``INFO :      …``) do not match."""


def entry_point(command: str) -> list[str]:
    """The command line of the entry point ``command`` (``superlink``,
    ``supernode``) of :data:`ENTRY_MODULE`, with this interpreter."""
    return [sys.executable, "-m", ENTRY_MODULE, command]


def log_to_stderr() -> None:
    """fedtrain's progress and warnings to stderr (:data:`OWN_LOG_FORMAT`),
    leaving Flower's own logging (which has its handlers and levels) alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(OWN_LOG_FORMAT))
    root = logging.getLogger("fedtrain")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def relog(line: str) -> None:
    """Show fedtrain's own log ``line`` of a child's log on this process's console."""
    found = OWN_LOG_LINE.match(line)
    if found is not None:
        logging.getLogger(found["name"]).log(getattr(logging, found["level"]), "%s", found["message"])


def die_with_parent(parent: int | None = None) -> None:
    """In a child (before exec, or just forked): ask Linux to SIGTERM it when
    its parent dies, even by SIGKILL, so no SuperLink, SuperNode or ClientApp
    outlives the process that started it. With ``parent`` (the pid that
    forked this process), a parent that died before the request was made
    ends this process at once, as Linux would have."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def exit_when_orphaned(parent: int, poll_seconds: float = 1.0) -> threading.Thread:
    """End this process (exit code 1) once ``parent`` is no longer its
    parent: for a process that fedtrain does not start itself, such as the
    ServerApp that Flower's SuperLink starts for a run, so that a coordinator
    killed with SIGKILL leaves no ServerApp behind. A watch thread, not
    ``PR_SET_PDEATHSIG``: that follows the parent *thread*, which in a
    program fedtrain does not own may end long before its process."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log.error("the process that started this one (pid %d) is gone; exiting", parent)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread


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
    """Every process below ``pid`` (not ``pid`` itself), from /proc."""
    tree = _children()
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not), from /proc."""
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
        """Start ``args`` with exactly ``env``, its output appended to ``log_path``."""
        out = open(log_path, "ab")
        proc = subprocess.Popen(
            list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
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
        while time.monotonic() < deadline and any(alive(pid) for pid in targets):
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


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of the log ``path`` ('' when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_listening(
    host: str, port: int, proc: subprocess.Popen[bytes], log_path: Path, wait: float, name: str = "the SuperLink"
) -> None:
    """Return once ``host:port`` accepts connections; :class:`DeployError`
    with the end of ``log_path`` when ``proc`` (``name``) exits first or
    ``wait`` seconds pass."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{name} exited with code {proc.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeployError(f"{name} did not listen on {host}:{port} within {wait:g} s:\n{tail(log_path)}")


@dataclass
class LogTail:
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
