"""Helpers for tests that run real ``fedtrain server`` / ``fedtrain client``
processes: start them, read their run folder, and make sure none survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
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


def wait_for(predicate: Callable[[], object], seconds: float, what: str) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:g} s for {what}")
        time.sleep(0.25)


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
