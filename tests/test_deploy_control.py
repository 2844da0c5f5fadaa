"""The coordinator's in-process Control API calls (:mod:`fedtrain.deploy.control`):
what is refused before any request, and how a run's status reads. The calls
themselves run against a real SuperLink in every deployment test."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtrain.deploy.addresses import free_port
from fedtrain.deploy.control import COMPLETED, ControlClient, RunStatus
from fedtrain.deploy.errors import DeployError


def test_a_key_file_that_is_no_nist_curve_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "client-1.pub"
    garbage.write_text("not a key\n")
    edwards = tmp_path / "client-2.pub"
    edwards.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))

    with ControlClient(f"127.0.0.1:{free_port()}") as control:
        with pytest.raises(DeployError, match="client-1.pub: not a public key in OpenSSH format"):
            control.register(garbage)
        with pytest.raises(DeployError, match="client-2.pub: a SuperNode key must be on a NIST elliptic curve"):
            control.register(edwards)


def test_an_unreachable_superlink_is_a_deploy_error_with_flowers_message(tmp_path: Path) -> None:
    with ControlClient(f"127.0.0.1:{free_port()}") as control:
        with pytest.raises(DeployError, match="^flwr ls failed: "):
            control.status(1)


def test_only_a_completed_run_reads_as_completed() -> None:
    assert RunStatus(COMPLETED, "").completed and RunStatus(COMPLETED, "").finished
    failed = RunStatus("finished:failed", "the ServerApp raised")
    assert failed.finished and not failed.completed
    assert not RunStatus("running", "").finished
