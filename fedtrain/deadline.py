"""A wall-clock limit on one client's work inside the simulation process.

``client.timeout`` turns a client that hangs (typically a stuck data loader)
into a failed client instead of a stuck run. The client's records are loaded
in a daemon thread that the round stops waiting for at the deadline: Python
cannot kill a thread, but the round goes on and the process can still exit.
Training, which is fedtrain's own code, is not interrupted from outside (a
``SIGALRM`` would be unsafe: raised inside a lazy import, it leaves torch's
operator registry half-initialised, and an abandoned training thread would
keep a core busy and write into buffers the next round reuses). It checks a
:class:`Deadline` instead: the batched engine between its steps, so a chunk
past the limit stops within one step; the sequential trainer after the
client, so a client whose load and training took longer than the limit is
failed after the fact.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class ClientTimeout(Exception):
    """A client's work ran past ``client.timeout``."""


def timeout_reason(seconds: float) -> str:
    """The failure a client past ``client.timeout = seconds`` is recorded with."""
    return f"took longer than client.timeout = {seconds} s"


class Deadline:
    """``seconds`` from now on the monotonic clock (``0`` = never): the point
    past which a client's work is abandoned."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds if seconds > 0 else None

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self._at is not None and time.monotonic() > self._at

    def check(self) -> None:
        """Raise :class:`ClientTimeout` once the deadline has passed (cheap
        enough to call between training steps: one clock read)."""
        if self._at is not None and time.monotonic() > self._at:
            raise ClientTimeout(timeout_reason(self.seconds))


def call_with_timeout(fn: Callable[[], T], seconds: float) -> T:
    """``fn()``, or :class:`ClientTimeout` if it has not returned after
    ``seconds`` (``0`` = wait for ever). Exceptions of ``fn`` propagate."""
    if seconds <= 0:
        return fn()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="fedtrain-client-load", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ClientTimeout
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
