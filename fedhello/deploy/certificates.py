"""Keys for a Flower federation: the SuperLink's TLS certificates (a throw-away CA and a server
certificate signed by it), one OpenSSH key pair per SuperNode, and the operator's mapping of
SuperNode public keys to client partitions (`flower.partition_keys`).

1. TLS for the SuperLink: a CA certificate (every SuperNode and the `flwr` CLI trust it) and a
   server certificate for the SuperLink's IP address, signed by the CA
   (`make_tls_certificates`).
2. One key pair per SuperNode, in OpenSSH format: the public key is registered with the
   SuperLink (`flwr supernode register`), the private key stays on the SuperNode's machine
   (`make_supernode_keys`).

The certificates are throw-away ones, valid for two days: enough to try a deployment. For a
long-lived one, use certificates from your own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["make_supernode_keys", "make_tls_certificates", "write_partition_keys", "write_private"]

CERTIFICATE_DAYS = 2  # how long the throw-away certificates are valid
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates are valid from this long before now


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (mode 0600, also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def make_tls_certificates(
    directory: Path, host: str = "127.0.0.1", also: tuple[str, ...] = ()
) -> dict[str, Path]:
    """A throw-away CA and a server certificate for the IP address `host`, signed by it.

    Writes PEM files into `directory` (made if missing) and returns their paths:
    "ca" (ca.crt: for the SuperNodes' `--root-certificates` and the `flwr` CLI), "cert"
    (server.pem) and "key" (server.key: for the SuperLink's `--ssl-certfile`/`--ssl-keyfile`).
    The server certificate names `host`, the addresses in `also` and "localhost" (the reverse
    proxy reaches the SuperLink as localhost); both certificates are valid for two days.
    """
    # imported here: cryptography is slow to import and only key making needs it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhello test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.IPAddress(ipaddress.ip_address(h)) for h in dict.fromkeys((host, *also))),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    return paths


def make_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, as `flwr supernode register` and the SuperNode expect.

    Writes `directory/name` (the private key, for `flower-supernode --auth-supernode-private-key`)
    and `directory/name.pub` (the public key, for `flwr supernode register`); returns both paths.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def write_partition_keys(path: Path, public_keys: list[Path]) -> Path:
    """The operator's mapping file for `flower.partition_keys`: public key i -> partition i."""
    import yaml

    from fedhello.flower.identity import normalise_key

    mapping = {normalise_key(p.read_text()): i for i, p in enumerate(public_keys)}
    path.write_text(
        "# SuperNode public key -> the client partition it may serve (flower.partition_keys)\n"
        + yaml.safe_dump(mapping, sort_keys=False, width=1000)
    )
    return path
