"""The coordinator's calls on its own SuperLink's Control API, made in process.

``fedtrain server`` registers its clients' keys, submits the run and asks
for the run's status on the SuperLink it started, whose Control API listens
on loopback only (:mod:`fedtrain.deploy.superlink`). These are the calls of
``flwr supernode register``, ``flwr run`` and ``flwr ls``, made here with
Flower's own Control API client, app-bundle builder and error messages
instead of a ``flwr`` process each: every such process starts Python and
imports Flower again, a CPU-second or two per call that a coordinator with
many clients paid once per key before its first round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from fedtrain.deploy.errors import DeployError
from fedtrain.deploy.flower import check_flower_version

_Answer = TypeVar("_Answer")

COMPLETED = "finished:completed"
"""A run's status once its ServerApp returned (Flower's ``status:sub_status``)."""


@dataclass(frozen=True)
class RunStatus:
    """A run's status as Flower's SuperLink reports it."""

    status: str
    """``status:sub_status`` as ``flwr ls`` shows it, e.g. :data:`COMPLETED`."""
    details: str
    """Flower's explanation of a failure; empty otherwise."""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


class ControlClient:
    """The Control API of the SuperLink at ``address`` (loopback, plain
    text: that port is reachable from this machine only). Every failure is a
    :class:`~fedtrain.deploy.errors.DeployError` with Flower's own message."""

    def __init__(self, address: str) -> None:
        check_flower_version()
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def register(self, key_file: Path) -> int:
        """Register a client's public key (OpenSSH format, an elliptic curve
        of NIST's, as ``fedtrain certs`` writes them and Flower requires);
        the SuperNode id Flower gave it."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

        try:
            key = serialization.load_ssh_public_key(key_file.read_bytes())
        except (OSError, ValueError, UnsupportedAlgorithm) as exc:
            raise DeployError(f"{key_file}: not a public key in OpenSSH format ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
            raise DeployError(f"{key_file}: a SuperNode key must be on a NIST elliptic curve (fedtrain certs makes P-384)")
        answer = _call("flwr supernode register", lambda: self._client.RegisterNode(
            RegisterNodeRequest(public_key=public_key_to_bytes(key))
        ))
        if not answer.node_id:
            raise DeployError("flwr supernode register failed: the SuperLink registered no SuperNode")
        return int(answer.node_id)

    def start_run(self, app: Path) -> int:
        """Submit the app folder ``app`` as a new run; its run id."""
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto
        from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.fab import Fab

        content = build_fab_from_disk(app)
        fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
        answer = _call("flwr run", lambda: self._client.StartRun(StartRunRequest(fab=fab_to_proto(fab))))
        if not answer.HasField("run_id"):
            raise DeployError("flwr run failed: the SuperLink started no run")
        return int(answer.run_id)

    def status(self, run_id: int) -> RunStatus:
        """Run ``run_id``'s status now."""
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        answer = _call("flwr ls", lambda: self._client.ListRuns(ListRunsRequest(run_id=run_id)))
        if run_id not in answer.run_dict:
            raise DeployError(f"flwr ls failed: the SuperLink knows no run {run_id}")
        found = answer.run_dict[run_id].status
        status = found.status if not found.sub_status else f"{found.status}:{found.sub_status}"
        return RunStatus(status, found.details)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call(what: str, request: Callable[[], _Answer]) -> _Answer:
    """``request()``, its failure raised as DeployError with the message the
    ``flwr`` command would have printed."""
    import click
    from flwr.cli.utils import flwr_cli_exc_handler

    try:
        with flwr_cli_exc_handler():
            return request()
    except click.ClickException as exc:
        raise DeployError(f"{what} failed: {exc.message}") from None
    except ValueError as exc:
        raise DeployError(f"{what} failed: {exc}") from None

