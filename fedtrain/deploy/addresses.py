"""Addresses and ports of a deployment: ``HOST:PORT`` parsing, loopback,
where this machine dials a listener, and a free local port."""

from __future__ import annotations

import ipaddress
import socket

from fedtrain.errors import UsageError

LOOPBACK = "127.0.0.1"


def split_address(address: str, parameter: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), with an error naming ``parameter``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{parameter} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_dial(host: str) -> str:
    """Where this machine reaches a listener bound to ``host``."""
    return {"0.0.0.0": LOOPBACK, "::": "::1", "": LOOPBACK}.get(host, host)


def free_port() -> int:
    """A TCP port of ``127.0.0.1`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])
