"""Helpers for tests that run real ``fedtrain server`` / ``fedtrain client``
processes: start them, read their run folder, and make sure none survives.

A deployment mostly waits (on sockets, timeouts and Python start-ups), so
each test module's deployment is registered with :func:`in_background` and
started in a thread as the session begins (``conftest.py``); the tests that
look at it wait for its result (:func:`background_result`) while the
CPU-bound tests run. So is any other test's work that runs in processes of
its own (a killed and resumed simulation, children that measure their
memory): on two cores, it then runs beside the session's one thread of
tests instead of after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping


def cli(*args: str) -> list[str]:
    """The command line of ``fedtrain ARGS`` with this interpreter."""
    return [sys.executable, "-m", "fedtrain.cli", *args]


def fedtrain_script() -> Path:
    """The installed ``fedtrain`` console script of this environment."""
    script = Path(sysconfig.get_path("scripts")) / "fedtrain"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: no fedtrain console script; install the package (pip install -e .)")
    return script


def wait_for(predicate: Callable[[], object], seconds: float, what: str, every: float = 0.25) -> None:
    """Poll ``predicate`` every ``every`` seconds until it is true;
    TimeoutError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:g} s for {what}")
        time.sleep(every)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _hex_address(text: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6} (little-endian hex words) → (ip, port)."""
    import ipaddress

    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def listening(pids: list[int]) -> dict[tuple[str, int], int]:
    """The TCP sockets that ``pids`` listen on, (ip, port) → pid, read from
    /proc/net/tcp{,6} and each process's open file descriptors."""
    inodes: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                inodes[fields[9]] = _hex_address(fields[1])
    found: dict[tuple[str, int], int] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found[inodes[target[8:-1]]] = pid
    return found


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows written so far (none before the first round)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Started:
    """Processes a test started, each in its own session and logging to
    ``logs/NAME.log``; all of them are killed on exit, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", MPLBACKEND="Agg")
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` logging to ``logs/NAME.log``, with ``env`` over the test environment."""
        with open(self.logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def restart_client(started: Started, name: str, args: list[str], seconds: float = 90.0) -> subprocess.Popen[bytes]:
    """Start a client again after it was killed. The SuperLink holds a
    killed client's key until it misses its heartbeats
    (:data:`fedtrain.deploy.flower.KEY_HOLD_SECONDS`) and refuses it until
    then, so a refused start is tried again (``NAME``, ``NAME-1``, …) until
    one connects or ``seconds`` pass; the last process started."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        label = name if attempt == 0 else f"{name}-{attempt}"
        proc = started.start(label, args)
        while proc.poll() is None and "connected to" not in started.log(label):
            if time.monotonic() > deadline:
                return proc
            time.sleep(0.25)
        if proc.poll() is None or time.monotonic() > deadline:
            return proc
        attempt += 1
        time.sleep(1.0)


# ------------------------------------------------- deployments in background

BACKGROUND_AT_ONCE = 2
"""Deployments that run at the same time in the background: each spends most
of its time waiting on sockets and on Python start-ups, but two cores run
only so many start-ups before a deployment's own timeouts feel it."""

_launchers: dict[str, tuple[float, Callable[[Path], Any]]] = {}
_futures: dict[str, "Future[Any]"] = {}
_pool: "ThreadPoolExecutor | None" = None


def in_background(name: str, seconds: float) -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:
    """Register ``deploy(root) -> result`` as the background deployment
    ``name`` (its test module's name, or the module's name and a test's),
    which takes about ``seconds`` on its own: when the session has
    collected a test of that module, :func:`start_background_` starts it
    before the first test runs, and :func:`background_result` hands the
    tests its result."""

    def register(deploy: Callable[[Path], Any]) -> Callable[[Path], Any]:
        _launchers[name] = (seconds, deploy)
        return deploy

    return register


def is_background(name: str) -> bool:
    """Whether ``name`` is a registered background deployment."""
    return name in _launchers


def start_background_(names: list[str], mktemp: Callable[[str], Path]) -> None:
    """Start the registered deployments among ``names`` (the longest
    first), :data:`BACKGROUND_AT_ONCE` at a time, each in a fresh folder
    from ``mktemp``; the CPU-bound tests run meanwhile."""
    global _pool
    wanted = sorted((n for n in set(names) if n in _launchers and n not in _futures),
                    key=lambda n: -_launchers[n][0])
    if not wanted:
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(BACKGROUND_AT_ONCE, thread_name_prefix="deployment")
    for name in wanted:
        _futures[name] = _pool.submit(_launchers[name][1], mktemp(name.replace(".", "-").replace(":", "-")))


def background_result(name: str, mktemp: Callable[[str], Path]) -> Any:
    """The result of the background deployment ``name``; started here and
    waited for when the session did not start it."""
    start_background_([name], mktemp)
    return _futures[name].result()


def finish_background_() -> None:
    """Wait for every background deployment (each kills its own processes)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _futures.clear()
