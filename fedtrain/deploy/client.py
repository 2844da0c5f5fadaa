"""``fedtrain client``: one client of a deployment.

A client starts its warm :class:`~fedtrain.deploy.worker.ClientWorker` (in
this process, behind a Unix socket with a random key) and a SuperNode
(:mod:`fedtrain.deploy.supernode`, a child process) whose ``ClientApp``
relays each message to the worker. That SuperNode runs fedtrain's own app
only (:func:`fedtrain.deploy.app.fab_refusal`), and the worker builds only
built-in models and data sets unless the client's own command line allows a
plug-in (``--allow-plugin``): a client never imports code because a
coordinator named it.

With ``--certs`` the client verifies the coordinator against ``ca.pem`` and
authenticates with its own key (``--key``); ``--insecure`` sends its updates
in plain text. Flower's state and logs live in a temporary folder, removed
when the client stops; a refusal by the coordinator is told in one line
with its likely cause (:data:`REFUSAL_HINTS`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtrain.deploy.addresses import free_port, split_address
from fedtrain.deploy.errors import DeployError, check_positive
from fedtrain.deploy.flower import (
    ACTIVATION_REFUSED,
    KEY_HOLD_SECONDS,
    NODE_JOINED,
    check_flower_version,
    flower_env,
    supernode_args,
    supernode_node_args,
    supernode_tls_args,
)
from fedtrain.deploy.processes import LogTail, Processes, entry_point, relog
from fedtrain.errors import MissingFileError, UsageError
from fedtrain.transport.relay import DEFAULT_POLL
from fedtrain.transport.relay import NODE_KEY_FILE, NODE_WORKER

if TYPE_CHECKING:
    from fedtrain.deploy.worker import WorkerServer

log = logging.getLogger(__name__)


MAX_DELAY_SECONDS = 3600.0
"""The longest ``--delay`` (an hour: longer is a client that never answers)."""


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
    delay_seconds: float = 0.0
    """Added to every training job before it is answered (``--delay``): a
    slow device or link, to try stragglers and asynchronous runs."""

    def __post_init__(self) -> None:
        check_positive("--connect-timeout", self.connect_seconds)
        check_positive("--poll", self.poll_seconds)
        if not 0.0 <= self.delay_seconds <= MAX_DELAY_SECONDS:
            raise UsageError(f"--delay {self.delay_seconds}: must be between 0 and {MAX_DELAY_SECONDS:g} seconds")
        for name in self.allow_plugins:
            module, sep, attr = name.rpartition(":")
            if not sep or not module or not attr:
                raise UsageError(
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
"""What a SuperNode's log (a Flower line) means for the client's operator,
by the first line that contains it."""


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
    :class:`~fedtrain.deploy.errors.DeployError` when the coordinator
    refuses it or cannot be reached. The worker (and torch) is imported once
    the command line checked out."""
    split_address(options.server, "--server")
    check_flower_version()
    args = [*entry_point("supernode"), "--poll", str(options.poll_seconds),
            *supernode_args(options.server, options.connect_seconds)]
    if options.certs is None:
        log.warning("--insecure: this client sends its updates in plain text")
        args += supernode_tls_args(None)
    else:
        ca = options.certs / "ca.pem"
        if not ca.is_file():
            raise MissingFileError(f"--certs {options.certs}: no ca.pem there")
        if options.key is None or not options.key.is_file():
            raise MissingFileError(f"--key {options.key}: no such private key (fedtrain certs writes client-N)")
        args += supernode_tls_args((ca, options.key))
    from fedtrain.deploy.worker import ClientWorker, WorkerServer

    name = options.partition if options.partition is not None else Path(str(options.data)).stem
    worker = ClientWorker(
        name, options.partition, options.data, options.device, options.allow_plugins, options.delay_seconds
    )
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
    args = [*args, *supernode_node_args(node_config, free_port())]
    node_log = folder / "supernode.log"
    with Processes() as procs:
        log.info("client %s connecting to %s", name, options.server)
        while True:
            node_log.write_bytes(b"")
            node = procs.start(args, flower_env(folder / "home", options.poll_seconds), node_log)
            tail = LogTail(node_log)
            joined = False
            while True:
                running = node.poll() is None
                for line in tail.lines():
                    if not joined and NODE_JOINED in line:
                        joined = True
                        log.info("client %s connected to %s", name, options.server)
                    relog(line)
                if not running:
                    break
                if stop is not None and stop.is_set():
                    return 0
                time.sleep(0.2)
            if not joined:
                raise DeployError(_refusal(node_log.read_text(errors="replace"), options))
            log.warning("client %s lost the coordinator; reconnecting", name)
