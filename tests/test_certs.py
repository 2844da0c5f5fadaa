"""``fedtrain certs``: the CA, the coordinator's certificate and client keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtrain.certs import CertificateSet, create_certificates
from fedtrain.cli import main


def test_files_and_private_key_modes(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path / "c", ["127.0.0.1", "example.org"], 2)

    names = sorted(p.name for p in certs.root.iterdir())
    assert names == ["ca.key", "ca.pem", "client-1", "client-1.pub", "client-2", "client-2.pub",
                     "server.key", "server.pem"]
    for private in ("ca.key", "server.key", "client-1", "client-2"):
        assert stat.S_IMODE((certs.root / private).stat().st_mode) == 0o600, private


def test_server_certificate_names_the_hosts_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path / "c", ["127.0.0.1", "example.org"], 0)

    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_keys_are_openssh_p384_pairs(tmp_path: Path) -> None:
    certs = create_certificates(tmp_path / "c", ["localhost"], 1)

    private = serialization.load_ssh_private_key((certs.root / "client-1").read_bytes(), None)
    public = serialization.load_ssh_public_key((certs.root / "client-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert CertificateSet(certs.root).client_keys() == [certs.root / "client-1.pub"]


def test_every_run_makes_new_keys(tmp_path: Path) -> None:
    a = create_certificates(tmp_path / "a", ["localhost"], 1)
    b = create_certificates(tmp_path / "b", ["localhost"], 1)

    assert (a.root / "client-1").read_bytes() != (b.root / "client-1").read_bytes()
    assert a.server_key.read_bytes() != b.server_key.read_bytes()


def test_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    create_certificates(tmp_path / "c", ["localhost"], 0)

    with pytest.raises(FileExistsError, match="ca.pem exists"):
        create_certificates(tmp_path / "c", ["localhost"], 0)


@pytest.mark.parametrize("hosts, clients, message", [([], 1, "--hosts"), (["localhost"], -1, "--clients")])
def test_bad_arguments_are_named(tmp_path: Path, hosts: list[str], clients: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_certificates(tmp_path / "c", hosts, clients)


def test_cli_writes_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["certs", "--out", str(tmp_path / "c"), "--hosts", "10.0.0.5,coordinator", "--clients", "3"])

    assert rc == 0
    assert "client-1, client-2, client-3" in capsys.readouterr().out
    assert len(CertificateSet(tmp_path / "c").client_keys()) == 3


def test_server_and_client_need_certs_or_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--server", "127.0.0.1:9092", "--partition", "0"]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err
    assert main(["client", "--server", "127.0.0.1:9092", "--insecure", "--certs", "x", "--partition", "0"]) == 2
    assert "not both" in capsys.readouterr().err
