"""fedhello/deploy/ without starting Flower: the certificates verify, the SuperNode keys have the
formats Flower expects, and `fedhello deploy keys` writes them (bad input is a UserError)."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhello.deploy.certificates import make_supernode_keys, make_tls_certificates
from fedhello.deploy.cli import add_deploy_commands
from fedhello.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhello")
    add_deploy_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return int(args.func(args))


def test_server_certificate_is_signed_by_the_ca_for_its_ip(tmp_path: Path) -> None:
    paths = make_tls_certificates(tmp_path / "certs")
    assert {p.name for p in paths.values()} == {"ca.crt", "server.pem", "server.key"}
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_supernode_keys_are_an_openssh_public_and_a_pem_private_key(tmp_path: Path) -> None:
    private, public = make_supernode_keys(tmp_path / "keys", "supernode-0")
    assert (private.name, public.name) == ("supernode-0", "supernode-0.pub")
    assert public.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == pub


def test_deploy_keys_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert _run("deploy", "keys", str(out), "--supernodes", "2", "--host", "10.0.0.5") == 0
    names = {"ca.crt", "server.pem", "server.key", "supernode-0", "supernode-0.pub", "supernode-1"}
    names |= {"supernode-1.pub", "partitions.yaml", "proxy.conf", "logs"}
    assert {p.name for p in out.iterdir()} == names
    for private in ("server.key", "supernode-0", "supernode-1"):
        assert (out / private).stat().st_mode & 0o777 == 0o600, private  # owner only
    mapping = yaml.safe_load((out / "partitions.yaml").read_text())
    assert sorted(mapping.values()) == [0, 1]
    assert (out / "supernode-1.pub").read_text().split()[1] in next(k for k, v in mapping.items() if v == 1)
    proxy = (out / "proxy.conf").read_text()
    assert "listen 10.0.0.5:9092 ssl;" in proxy and "proxy_pass https://127.0.0.1:9095;" in proxy
    assert "location /v1/fleet/" in proxy and "return 403;" in proxy
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 9 + 2  # one line per file, one register hint per SuperNode
    assert f"flwr supernode register {out / 'supernode-1.pub'} fedhello" in printed[-1]
    with pytest.raises(UserError, match="already exists"):  # never overwrites keys
        _run("deploy", "keys", str(out))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--supernodes", "0"], "--supernodes"),
        (["--host", "server.example"], "--host"),
    ],
)
def test_deploy_keys_rejects_bad_input(argv: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        _run("deploy", "keys", str(tmp_path / "fed"), *argv)
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--supernodes", "0"], "--supernodes"),
        (["--supernodes", "99"], "--supernodes: 99 SuperNodes for 20 client partitions"),
        (["--timeout", "-1"], "--timeout: must be positive"),
        (["--poll-interval", "0"], "--poll-interval: must be between 0.01 and 60 seconds"),
        (["--poll-interval", "nan"], "--poll-interval"),
    ],
)
def test_deploy_local_rejects_bad_input_before_starting_anything(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=message):
        _run("deploy", "local", "--out", str(tmp_path / "run"), *argv)
    assert not (tmp_path / "run").exists()
