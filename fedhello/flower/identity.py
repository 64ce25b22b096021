"""Binding each client partition to the SuperNode key the operator registered for it.

With SuperNode authentication on, the SuperLink admits only nodes whose public keys the operator
registered, but any admitted node could still claim any `partition-id`. The operator therefore
also writes a mapping file, public key -> partition id (`fedhello deploy keys` writes one,
`partitions.yaml`), and names it in `flower.partition_keys`. At discovery the ServerApp sends
each node a fresh random challenge; the node's ClientApp signs it, together with the partition
it claims, with the private key its SuperNode authenticates with (`auth-key` in its node config,
the file given to `--auth-supernode-private-key`), and the ServerApp accepts the claim only when
the key is the one mapped to that partition and the signature verifies. A node thus serves
exactly the partition of its own key, for the whole run (docs/flower.md, "Identity").
"""

from __future__ import annotations

import secrets
from pathlib import Path

import yaml

from fedhello.errors import UserError


def _message(challenge: str, partition: int) -> bytes:
    return f"fedhello partition claim\n{challenge}\n{partition}".encode()


def new_challenge() -> str:
    return secrets.token_hex(32)


def normalise_key(text: str) -> str:
    """An OpenSSH public key as 'type base64' (the comment dropped)."""
    parts = text.split()
    return " ".join(parts[:2])


def load_partition_keys(path: str | Path) -> dict[int, str]:
    """partition id -> registered public key, from the operator's mapping file (YAML: key -> id).
    One line naming the file for anything wrong with it."""
    where = f"flower.partition_keys: {path}"
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"{where}: not YAML (expected 'PUBLIC KEY': PARTITION-ID lines)") from None
    if not isinstance(tree, dict) or not tree:
        raise UserError(f"{where}: expected a mapping of OpenSSH public keys to partition ids")
    out: dict[int, str] = {}
    for key, pid in tree.items():
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
            raise UserError(f"{where}: partition id {pid!r} is not a whole number >= 0")
        if pid in out:
            raise UserError(f"{where}: partition {pid} is mapped to two keys")
        if not isinstance(key, str) or len(key.split()) < 2:
            raise UserError(f"{where}: '{str(key)[:40]}' is not an OpenSSH public key")
        out[pid] = normalise_key(key)
    return out


def sign_claim(private_key_path: str | Path, challenge: str, partition: int) -> tuple[str, str]:
    """(public key, signature hex) for a partition claim, signed with the SuperNode's private key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the SuperNode key is not an elliptic-curve key")
    signature = key.sign(_message(challenge, partition), ec.ECDSA(hashes.SHA256()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode(), signature.hex()


def verify_claim(
    keys: dict[int, str], partition: int, challenge: str, public_key: str, signature: str
) -> str | None:
    """Why a signed claim of `partition` is refused, or None when it holds."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    expected = keys.get(partition)
    if expected is None:
        return f"no key is registered for partition {partition}"
    if normalise_key(public_key) != expected:
        return f"its key is not the one registered for partition {partition}"
    refused = f"its signature of the challenge does not verify with the key of partition {partition}"
    try:
        key = serialization.load_ssh_public_key(expected.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return refused
        key.verify(bytes.fromhex(signature), _message(challenge, partition), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return refused
    return None
