"""``python -m fedtrain.deploy superlink``: the coordinator's SuperLink,
Flower's own application with its APIs split over two listeners.

Ports. Flower 1.42 serves its Fleet API (SuperNodes), its Control API
(``flwr run / stop / ls``, ``flwr supernode register``) and its Runtime API
(ServerApps) on one HTTP port, the last two without any authentication:
whoever reaches that port can register a key, stop the run or submit an
app whose code every client then runs. So fedtrain serves Flower's
application on two listeners: ``--fleet`` (the clients' address) carries
the Fleet API alone (:class:`FleetOnly`), with TLS and SuperNode
authentication; every other API is on a port of ``127.0.0.1`` that only
the coordinator's machine reaches, where the coordinator's own calls
(:mod:`fedtrain.deploy.control`) and Flower's SuperExec go.

The Fleet address opens only once the coordinator has registered its
clients' keys (``--open-when``), so that a refused key is a refusal, never
a "not yet"; each TLS handshake that fails there is logged with what it
means (:data:`REFUSAL_MARK`, :data:`TLS_REFUSALS`), which the coordinator
shows its operator (:func:`fedtrain.deploy.server.refusal_reason`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Sequence

from fedtrain.deploy.addresses import LOOPBACK, split_address
from fedtrain.deploy.errors import DeployError
from fedtrain.deploy.flower import GRPC_API_SWITCHES, check_flower_version, superlink_app
from fedtrain.deploy.warm_start import SUPEREXEC, start_warm_programs

log = logging.getLogger(__name__)

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


def superlink_args(
    fleet: str, local_port: int, open_when: Path, tls: tuple[Path, Path, Path] | None
) -> list[str]:
    """The arguments of :func:`superlink_main` for a SuperLink whose Fleet API
    is on ``fleet`` with ``tls`` (certificate, key, CA; None: plain text)."""
    args = ["--fleet", fleet, "--local-port", str(local_port), "--open-when", str(open_when)]
    if tls is not None:
        certfile, keyfile, ca_certfile = tls
        args += ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile), "--ssl-ca-certfile", str(ca_certfile)]
    return args


def superlink_main(argv: Sequence[str]) -> None:
    """``python -m fedtrain.deploy superlink``: Flower's SuperLink, its APIs
    split over two listeners (see the module's "Ports").

    The application is Flower's own (:func:`fedtrain.deploy.flower.superlink_app`); it is served:

    - on ``127.0.0.1:--local-port``, plain HTTP, every API: the coordinator's
      calls, Flower's SuperExec and the ServerApp reach it there;
    - on ``--fleet`` (the clients' address), with TLS and SuperNode
      authentication unless no certificate is given: the Fleet API only. It
      opens once ``--open-when`` exists, which the coordinator creates after
      registering its clients' keys, so that a refused key is a refusal.

    Each TLS handshake that fails on the Fleet address is logged with its
    reason (:data:`REFUSAL_MARK`). Flower's SuperExec, which starts the
    run's ServerApp, is forked from a warm process
    (:func:`~fedtrain.deploy.warm_start.start_warm_programs`)."""
    import asyncio

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
    home = os.environ.get("FLWR_HOME")
    if home:
        start_warm_programs(Path(home), (SUPEREXEC,))

    flower = superlink_app(ns.local_port, (ns.ssl_certfile, ns.ssl_keyfile, ns.ssl_ca_certfile) if all(tls) else None)
    common: dict[str, Any] = dict(
        log_config=flower.log_config, access_log=False, proxy_headers=False,
        server_header=False, timeout_graceful_shutdown=5,
    )
    servers = [
        uvicorn.Server(uvicorn.Config(flower.app, host=LOOPBACK, port=ns.local_port, **common)),
        uvicorn.Server(uvicorn.Config(
            FleetOnly(flower.app, flower.fleet_paths), host=host, port=port, lifespan="off",
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

    log.info("SuperLink: Fleet API on %s:%d, every other API on %s:%d", host, port, LOOPBACK, ns.local_port)
    loop_factory = getattr(local_server.config, "get_loop_factory", lambda: None)()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())
