"""Key material for a deployment: a CA, the coordinator's TLS certificate and
one authentication key pair per client, written by ``fedtrain certs``.

Everything is made with the ``cryptography`` package; private keys come from
the operating system's CSPRNG through it and are written with mode 0600.

- TLS: the CA signs the coordinator's certificate, whose subject alternative
  names are the hosts clients dial; clients verify the coordinator against
  ``ca.pem``. Each CA has a name of its own (``fedtrain CA`` and a random
  tag), so a client holding another deployment's ``ca.pem`` fails with
  "unknown CA", not with a confusing signature error. Keys are ECDSA on P-384 (NIST SP 800-186; TLS 1.3 suite B
  strength), certificates are valid for :data:`VALIDITY_DAYS`.
- Client authentication: each client signs its requests with its own P-384
  key (Flower's SuperNode authentication, which accepts NIST curves only, in
  OpenSSH format). The coordinator registers ``client-N.pub`` and refuses any
  node whose key it does not know.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtrain.errors import ExistingFileError, MissingFileError, UsageError

VALIDITY_DAYS = 825
"""The longest lifetime browsers and the CA/Browser Forum baseline accepted
for server certificates (BR 6.3.2, 2018–2020); long enough for a study."""

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CLIENT_PREFIX = "client-"


@dataclass(frozen=True)
class CertificateSet:
    """Where one deployment's key material lies."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def client_keys(self) -> list[Path]:
        """The registered clients' public keys, ``client-N.pub``, in name order."""
        return sorted(self.root.glob(f"{CLIENT_PREFIX}*.pub"))

    def client_key_pems(self) -> dict[str, str]:
        """Each registered client's public key as PEM (SubjectPublicKeyInfo,
        the form Flower's SuperLink logs keys in) → its ``client-N.pub`` name,
        so that a refusal the SuperLink logs can name the key file."""
        pems: dict[str, str] = {}
        for path in self.client_keys():
            key = serialization.load_ssh_public_key(path.read_bytes())
            pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            pems[pem.decode("ascii").strip()] = path.name
        return pems

    def require_server(self) -> None:
        """Raise naming every file the coordinator needs and lacks."""
        missing = [p for p in (self.ca, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise MissingFileError(
                f"--certs {self.root}: missing {', '.join(str(p) for p in missing)}; "
                f"create them with `fedtrain certs --out {self.root}`"
            )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 before any secret byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: str,
    signing_key: ec.EllipticCurvePrivateKey,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def create_certificates(out: Path, hosts: Sequence[str], clients: int) -> CertificateSet:
    """Write a CA, a server certificate for ``hosts`` and ``clients`` client key
    pairs into ``out``; refuses to overwrite an existing CA."""
    if not hosts:
        raise UsageError("--hosts is empty: name at least one host clients will dial, e.g. 127.0.0.1")
    if clients < 0:
        raise UsageError(f"--clients = {clients}: must be >= 0")
    certs = CertificateSet(Path(out))
    if certs.ca.exists():
        raise ExistingFileError(
            f"{certs.ca} exists: refusing to replace a CA that clients may already trust; "
            "choose another --out or remove the folder"
        )
    certs.root.mkdir(parents=True, exist_ok=True)

    ca_key = _new_key()
    ca_name = f"fedtrain CA {secrets.token_hex(4)}"
    ca_cert = _certificate(
        ca_name, ca_key.public_key(), ca_name, ca_key,
        [(x509.BasicConstraints(ca=True, path_length=0), True),
         (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)],
    )
    server_key = _new_key()
    server_cert = _certificate(
        hosts[0], server_key.public_key(), ca_name, ca_key,
        [(x509.SubjectAlternativeName(_subject_names(hosts)), False),
         (x509.BasicConstraints(ca=False, path_length=None), True),
         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )
    _write_private(certs.root / CA_KEY, _pem_key(ca_key))
    _write_private(certs.server_key, _pem_key(server_key))
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for i in range(1, clients + 1):
        add_client_key(certs, f"{CLIENT_PREFIX}{i}")
    return certs


def add_client_key(certs: CertificateSet, name: str) -> Path:
    """Write the key pair ``name`` (OpenSSH private key, 0600) and ``name.pub``."""
    path = certs.root / name
    if path.exists():
        raise ExistingFileError(f"{path} exists: refusing to replace a client key")
    key = _new_key()
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(name + ".pub").write_bytes(public + f" fedtrain-{name}\n".encode())
    return path
