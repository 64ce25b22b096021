"""A Flower deployment on this machine: one SuperLink and one SuperNode per client partition,
each a separate process, with TLS and SuperNode authentication from self-made keys.

It runs exactly the commands docs/flower.md gives for real machines, so the tests and the
benchmark exercise the deployment path users follow. Every process it starts is stopped by
its process id when the context ends, including on errors.

    with LocalDeployment(work_dir, num_supernodes=3) as fed:
        fed.run(config_path, out_dir)          # flwr run . NAME --run-config ... --stream
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FEDERATION = "fedhello-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower command from this Python's environment."""
    return str(Path(sys.executable).parent / name)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_tls_certificates(directory: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throw-away CA and a server certificate for `host` signed by it (PEM files)."""
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
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
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
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
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
    """An EC key pair in OpenSSH format, as `flwr supernode register` and the SuperNode expect."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class LocalDeployment:
    """SuperLink + SuperNodes as separate processes on 127.0.0.1 (TLS and node auth by default)."""

    def __init__(
        self,
        work_dir: Path,
        num_supernodes: int,
        *,
        app_dir: Path | None = None,
        tls: bool = True,
        auth: bool = True,
    ) -> None:
        self.work = work_dir.resolve()
        self.num_supernodes = num_supernodes
        self.app_dir = (app_dir or Path(__file__).resolve().parents[2]).resolve()
        self.tls, self.auth = tls, auth
        self.port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.work / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            # the SuperLink and SuperNodes start flower-superexec and flwr-* helpers by name
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.startup_seconds = 0.0

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / "logs" / f"{name}.log").open("wb")
        self._logs.append(log)
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _security_args(self, *, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if server:
            return [
                "--ssl-certfile",
                str(self.certs["cert"]),
                "--ssl-keyfile",
                str(self.certs["key"]),
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
            ]
        return ["--root-certificates", str(self.certs["ca"])]

    def start(self) -> LocalDeployment:
        start = time.perf_counter()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_tls_certificates(self.work / "certs")
        connection = f'address = "127.0.0.1:{self.port}"\n' + (
            f'root-certificates = "{self.certs["ca"]}"\n' if self.tls else "insecure = true\n"
        )
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n{connection}'
        )
        args = [
            _bin("flower-superlink"),
            *self._security_args(server=True),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", str(self.work / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.auth:
            args.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", args)
        self._wait_for_port(self.superlink, self.port, 60.0)
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.startup_seconds = time.perf_counter() - start
        return self

    def start_supernode(self, partition: int) -> None:
        args = [
            _bin("flower-supernode"),
            *self._security_args(server=False),
            "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()),
            "--node-config", f"partition-id={partition} num-partitions={self.num_supernodes}",
        ]  # fmt: skip
        if self.auth:
            private, public = make_supernode_keys(self.work / "keys", f"supernode-{partition}")
            self._flwr(["supernode", "register", str(public), FEDERATION], timeout=60)
            args += ["--auth-supernode-private-key", str(private)]
        self.supernodes[partition] = self._spawn(f"supernode-{partition}", args)

    def kill_supernode(self, partition: int) -> None:
        """Kill a SuperNode and its ClientApp processes at once, as a crashed machine would stop."""
        root = psutil.Process(self.supernodes[partition].pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.supernodes[partition].wait(timeout=10)

    def _flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [_bin("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.work,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc

    def _wait_for_port(self, proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"SuperLink exited with status {proc.returncode}; see {self.work / 'logs'}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"SuperLink did not open port {port} within {timeout:.0f} s")

    # -- runs --------------------------------------------------------------------------------
    def run(self, config_path: Path, out_dir: Path, *, resume: bool = False, timeout: float = 900) -> str:
        """`flwr run` the app with this config into out_dir; returns the streamed log."""
        run_config = f"config-path='{config_path.resolve()}' out-dir='{out_dir.resolve()}' resume={str(resume).lower()}"
        proc = self._flwr(
            ["run", str(self.app_dir), FEDERATION, "--run-config", run_config, "--stream"], timeout=timeout
        )
        return proc.stdout

    def stop(self) -> None:
        """Stop every process this deployment started, helpers included (the SuperLink starts
        flower-superexec, which starts the ServerApp in a session of its own), by process id."""
        roots = [p for p in [self.superlink, *self.supernodes.values()] if p is not None]
        procs = []
        for root in roots:
            try:
                parent = psutil.Process(root.pid)
                procs += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        for root in roots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                root.wait(timeout=1)  # reap
        for log in self._logs:
            log.close()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
