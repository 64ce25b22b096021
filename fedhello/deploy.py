"""Setting up a Flower federation for fedhello: certificates, SuperNode keys, and a local trial.

A Flower deployment is one SuperLink (on the server machine) and one SuperNode per client
partition (each on its client machine); docs/flower.md gives the commands for real machines.
What it needs, and what this module makes:

1. TLS for the SuperLink: a CA certificate (every SuperNode and the `flwr` CLI trust it) and a
   server certificate for the SuperLink's IP address, signed by the CA
   (`make_tls_certificates`).
2. One key pair per SuperNode, in OpenSSH format: the public key is registered with the
   SuperLink (`flwr supernode register`), the private key stays on the SuperNode's machine
   (`make_supernode_keys`).
3. To try it all on one machine first: `LocalDeployment` starts a SuperLink and SuperNodes as
   separate processes on 127.0.0.1, with TLS and SuperNode authentication from such
   self-made keys, runs an experiment with `flwr run`, and stops every process it started by
   its process id when the context ends, errors included.

    with LocalDeployment(work_dir, num_supernodes=3) as fed:
        fed.run(config_path, out_dir)          # flwr run . NAME --run-config ... --stream

From the command line (`add_deploy_commands` adds them to `fedhello`):

    fedhello deploy keys DIR [--supernodes N] [--host HOST]   # CA, server cert, N key pairs
    fedhello deploy local [CONFIG] [overrides ...] --out DIR  # the experiment on a local federation

The certificates are throw-away ones, valid for two days: enough to try a deployment. For a
long-lived one, use certificates from your own CA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import psutil

from fedhello.errors import UserError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "FEDERATION",
    "LocalDeployment",
    "add_deploy_commands",
    "cmd_deploy_keys",
    "cmd_deploy_local",
    "make_supernode_keys",
    "make_tls_certificates",
]

FEDERATION = "fedhello-local"
"""The federation name `LocalDeployment` writes into its `flwr` configuration."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_app_dir() -> Path:
    """The checkout this module is in: the Flower app (its pyproject.toml declares it)."""
    return Path(__file__).resolve().parents[1]


def _bin(name: str) -> str:
    """A Flower command from this Python's environment."""
    return str(Path(sys.executable).parent / name)


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


# -- keys ------------------------------------------------------------------------------------
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

    from fedhello.engine.identity import normalise_key

    mapping = {normalise_key(p.read_text()): i for i, p in enumerate(public_keys)}
    path.write_text(
        "# SuperNode public key -> the client partition it may serve (flower.partition_keys)\n"
        + yaml.safe_dump(mapping, sort_keys=False, width=1000)
    )
    return path


def proxy_config(
    *,
    listen: str,
    superlink_port: int,
    certs: dict[str, Path],
    work_dir: Path,
) -> str:
    """An nginx configuration that exposes only the SuperLink's Fleet API (`/v1/fleet/`, what
    SuperNodes call) on the client-facing address `listen` ("IP:PORT"), over TLS with the
    SuperLink's certificate, and forwards it to the SuperLink on 127.0.0.1:`superlink_port`,
    verifying the SuperLink's certificate. Every other path, the Control API (`/v1/control/`,
    where `flwr supernode register` and `flwr run` go) included, is answered 403. Logs, pid and
    temporary files go under `work_dir`. Run it with `nginx -p WORK_DIR -c FILE`."""
    tmp = work_dir / "nginx-tmp"
    user = "user root root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return f"""# fedhello: the client-facing side of a SuperLink (docs/flower.md, "Authenticated deployment")
{user}worker_processes 1;
pid {work_dir / "nginx.pid"};
error_log {work_dir / "logs" / "proxy-error.log"} warn;
events {{ worker_connections 512; }}
http {{
    access_log {work_dir / "logs" / "proxy-access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    client_max_body_size 0;             # adapters and models may be large
    server {{
        listen {listen} ssl;
        ssl_certificate {certs["cert"]};
        ssl_certificate_key {certs["key"]};
        location /v1/fleet/ {{             # SuperNodes: register, pull and push messages, FABs
            proxy_pass https://127.0.0.1:{superlink_port};
            proxy_ssl_trusted_certificate {certs["ca"]};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 403; }}       # the Control API and anything else: not from here
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary (Debian's `nginx` package), or None."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


# -- a federation on this machine ------------------------------------------------------------
DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between a SuperExec's requests for a message to run (Flower's default: 1 s). Each
request costs the SuperExec and its SuperNode CPU; docs/flower.md gives the measured trade-off."""
POLL_INTERVAL_RANGE = (0.01, 60.0)  # what flwr 1.42 accepts


def check_poll_interval(seconds: float, name: str) -> float:
    """`seconds` when Flower accepts it as SuperExec's poll interval; else a UserError naming `name`."""
    low, high = POLL_INTERVAL_RANGE
    if not low <= seconds <= high:  # NaN fails too
        raise UserError(f"{name}: must be between {low:g} and {high:g} seconds (got {seconds:g})")
    return seconds


CLIENT_FACING_HOST = "127.0.0.2"
"""Where a LocalDeployment's reverse proxy listens: a loopback address other than the
SuperLink's 127.0.0.1, standing in for the server's public address."""


class LocalDeployment:
    """SuperLink + SuperNodes as separate processes on loopback, secured as a real deployment.

    By default: TLS; SuperNode authentication (a key pair per SuperNode, the public key
    registered by the operator, private keys 0600); each partition bound to its SuperNode's key
    (`partitions.yaml`, passed to the run as flower.partition_keys); and the SuperLink on
    127.0.0.1 behind an nginx reverse proxy that exposes only the Fleet API on 127.0.0.2 (the
    client-facing address), so the Control API is out of reach of SuperNodes. `proxy=False`,
    `auth=False` or `tls=False` turn parts off (tests of other things; not for real use).

    `work_dir` receives the certificates, keys, logs (`logs/`), the SuperLink's database and the
    `flwr` configuration (`FLWR_HOME`). SuperNode i holds client partition i. `app_dir` is the
    Flower app (a checkout of fedhello; default: the one this module is in).
    """

    def __init__(
        self,
        work_dir: Path,
        num_supernodes: int,
        *,
        app_dir: Path | None = None,
        tls: bool = True,
        auth: bool = True,
        proxy: bool | None = None,
        warm: bool = True,
        node_config: dict[int, str] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.work = work_dir.resolve()
        self.num_supernodes = num_supernodes
        self.app_dir = (app_dir or _default_app_dir()).resolve()
        self.tls, self.auth = tls, auth
        self.proxy = tls if proxy is None else proxy
        if self.proxy and not tls:
            raise ValueError("the reverse proxy serves TLS: proxy=True needs tls=True")
        self.nginx = find_nginx() if self.proxy else None
        if self.proxy and self.nginx is None:
            raise UserError(
                "nginx not found: the deployment keeps the Control API behind an nginx reverse proxy "
                "(apt-get install nginx-light); without it, pass --no-proxy (the Control API is then "
                "reachable wherever the SuperLink is)"
            )
        self.warm = warm  # SuperNodes fork ClientApps from a warm process (fedhello/engine/warm.py)
        self.extra_node_config = node_config or {}
        self.port = _free_port()  # the SuperLink (Fleet and Control API), on 127.0.0.1
        self.proxy_port = _free_port()  # the reverse proxy, on CLIENT_FACING_HOST
        self.superlink: subprocess.Popen[bytes] | None = None
        self.proxy_proc: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        self.keys: dict[int, tuple[Path, Path]] = {}
        self.partition_keys: Path | None = None
        self._logs: list[IO[bytes]] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.work / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # how often each SuperExec asks its SuperNode for a message to run (Flower: 1 s)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(check_poll_interval(poll_interval, "poll_interval")),
            "HF_HUB_OFFLINE": "1",
            # the SuperLink and SuperNodes start flower-superexec and flwr-* helpers by name
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.startup_seconds = 0.0

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the proxy's client-facing address, or the SuperLink itself."""
        return f"{CLIENT_FACING_HOST}:{self.proxy_port}" if self.proxy else f"127.0.0.1:{self.port}"

    # -- processes ---------------------------------------------------------------------------
    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.work / "logs" / f"{name}.log").open("wb")
        self._logs.append(log)
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True
        )

    def _supernode_env(self) -> dict[str, str]:
        """With `warm`, a `flower-superexec` first on PATH that forks ClientApps from a warm process."""
        if not self.warm:
            return self.env
        bin_dir = self.work / "bin"
        wrapper = bin_dir / "flower-superexec"
        if not wrapper.exists():
            bin_dir.mkdir(parents=True, exist_ok=True)
            wrapper.write_text(
                f'#!/bin/sh\nexec "{sys.executable}" -c "from fedhello.engine.warm import main; main()" "$@"\n'
            )
            wrapper.chmod(0o755)
        return {**self.env, "PATH": f"{bin_dir}{os.pathsep}{self.env['PATH']}"}

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
        """Start the SuperLink (and the proxy), then register and start every SuperNode."""
        start = time.perf_counter()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_tls_certificates(self.work / "certs", "127.0.0.1", also=(CLIENT_FACING_HOST,))
        security = f'root-certificates = "{self.certs["ca"]}"\n' if self.tls else "insecure = true\n"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
            # what a client machine would reach: only the proxy (the Control API refused there)
            f'[superlink.client-facing]\naddress = "{self.fleet_address}"\n{security}'
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
        self._wait_for_port(self.superlink, "127.0.0.1", self.port, 60.0)
        if self.proxy:
            self._start_proxy()
        if self.auth:
            for i in range(self.num_supernodes):
                self.keys[i] = make_supernode_keys(self.work / "keys", f"supernode-{i}")
            self.partition_keys = write_partition_keys(
                self.work / "keys" / "partitions.yaml", [public for _, public in self.keys.values()]
            )
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.startup_seconds = time.perf_counter() - start
        return self

    def _start_proxy(self) -> None:
        assert self.nginx is not None
        conf = self.work / "proxy.conf"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.work / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
        conf.write_text(
            proxy_config(
                listen=self.fleet_address, superlink_port=self.port, certs=self.certs, work_dir=self.work
            )
        )
        self.proxy_proc = self._spawn(
            "proxy", [self.nginx, "-p", str(self.work), "-c", str(conf), "-g", "daemon off;"]
        )
        self._wait_for_port(self.proxy_proc, CLIENT_FACING_HOST, self.proxy_port, 30.0)

    def start_supernode(
        self, partition: int, *, private_key: Path | None = None, register: bool = True
    ) -> None:
        """Start the SuperNode holding `partition`. With node auth it authenticates with (and signs
        its partition claims with) its key pair, registered first unless `register=False`."""
        config = f"partition-id={partition} num-partitions={self.num_supernodes}"
        args = [
            _bin("flower-supernode"),
            *self._security_args(server=False),
            "--superlink", self.fleet_address,
            "--port", str(_free_port()),
        ]  # fmt: skip
        if self.auth:
            if private_key is None:
                private_key, public = self.keys[partition]
            else:
                public = private_key.with_name(private_key.name + ".pub")
            if register:
                self.register(public)
            args += ["--auth-supernode-private-key", str(private_key)]
            config += f" auth-key='{private_key}'"
        extra = self.extra_node_config.get(partition)
        args += ["--node-config", f"{config} {extra}" if extra else config]
        self.supernodes[partition] = self._spawn(f"supernode-{partition}", args, self._supernode_env())

    # -- the operator's Control API commands (on the SuperLink's own address) -----------------
    def register(self, public_key: Path, connection: str = FEDERATION) -> None:
        """`flwr supernode register`: admit the SuperNode with this public key."""
        self._flwr(["supernode", "register", str(public_key), connection], timeout=60)

    def unregister(self, node_id: int) -> None:
        """`flwr supernode unregister`: remove a SuperNode; its key no longer connects."""
        self._flwr(["supernode", "unregister", str(node_id), FEDERATION], timeout=60)

    def list_nodes(self) -> list[dict[str, object]]:
        """`flwr supernode list`: the registered SuperNodes (node id, public key, status)."""
        out = self._flwr(["supernode", "list", FEDERATION, "--format", "json"], timeout=60).stdout
        return list(json.loads(out[out.index("{") :]).get("nodes", []))

    def _flwr(self, args: list[str], timeout: float | None) -> subprocess.CompletedProcess[str]:
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

    def _wait_for_port(self, proc: subprocess.Popen[bytes], host: str, port: int, timeout: float) -> None:
        name = Path(str(proc.args[0])).name  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {self.work / 'logs'}")
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not open {host}:{port} within {timeout:.0f} s")

    # -- runs --------------------------------------------------------------------------------
    def run(
        self, config_path: Path, out_dir: Path, *, resume: bool = False, timeout: float | None = 900
    ) -> str:
        """`flwr run` the app with this config into out_dir; returns the streamed log.

        Raises RuntimeError when `flwr run` fails and subprocess.TimeoutExpired after `timeout`
        seconds (None: no limit).
        """
        run_config = f"config-path='{config_path.resolve()}' out-dir='{out_dir.resolve()}' resume={str(resume).lower()}"
        if self.partition_keys is not None:
            run_config += f" partition-keys='{self.partition_keys}'"
        return self.run_app(run_config, timeout=timeout)

    def run_app(self, run_config: str, *, timeout: float | None = 900) -> str:
        """`flwr run APP_DIR --run-config RUN_CONFIG --stream`; returns the streamed log."""
        proc = self._flwr(
            ["run", str(self.app_dir), FEDERATION, "--run-config", run_config, "--stream"], timeout=timeout
        )
        return proc.stdout

    def stop(self) -> None:
        """Stop every process this deployment started, helpers included (the SuperLink starts
        flower-superexec, which starts the ServerApp in a session of its own), by process id."""
        roots = [p for p in [self.superlink, self.proxy_proc, *self.supernodes.values()] if p is not None]
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


# -- command line ----------------------------------------------------------------------------
def _positive(value: int, name: str) -> int:
    if value < 1:
        raise UserError(f"{name}: must be at least 1 (got {value})")
    return value


def cmd_deploy_keys(args: argparse.Namespace) -> int:
    """`fedhello deploy keys DIR`: CA, server certificate and SuperNode key pairs into DIR."""
    n = _positive(args.supernodes, "--supernodes")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise UserError(f"--host: '{args.host}' is not an IP address") from None
    directory = Path(args.dir)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"DIR: {directory} is not a directory")
    names = ["ca.crt", "server.pem", "server.key", "partitions.yaml", "proxy.conf"]
    names += [f for i in range(n) for f in (f"supernode-{i}", f"supernode-{i}.pub")]
    taken = [f for f in names if (directory / f).exists()]
    if taken:
        raise UserError(f"DIR: {directory / taken[0]} already exists; choose another directory")
    certs = make_tls_certificates(directory, args.host)
    print(f"{certs['ca']}  (CA certificate: --root-certificates of SuperNodes and flwr)")
    print(f"{certs['cert']}  (SuperLink certificate for {args.host})")
    print(f"{certs['key']}  (SuperLink private key)")
    publics = []
    for i in range(n):
        private, public = make_supernode_keys(directory, f"supernode-{i}")
        print(f"{private}  (SuperNode {i} private key: --auth-supernode-private-key)")
        print(f"{public}  (SuperNode {i} public key)")
        publics.append(public)
    mapping = write_partition_keys(directory / "partitions.yaml", publics)
    print(f"{mapping}  (public key -> partition: flower.partition_keys / run config partition-keys)")
    (directory / "logs").mkdir(exist_ok=True)
    proxy = directory / "proxy.conf"
    proxy.write_text(
        proxy_config(
            listen=f"{args.host}:{args.port}",
            superlink_port=args.superlink_port,
            certs=certs,
            work_dir=directory.resolve(),
        )
    )
    print(
        f"{proxy}  (nginx: the Fleet API on {args.host}:{args.port} -> SuperLink on 127.0.0.1:{args.superlink_port})"
    )
    for public in publics:
        print(f"register: flwr supernode register {public} fedhello  (see docs/flower.md)")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """`fedhello deploy local`: the experiment on a TLS + authenticated federation on 127.0.0.1."""
    import yaml

    from fedhello.config import load_config
    from fedhello.engine.loop import holds_run

    cfg = load_config(args.config, args.overrides)  # `fedhello` moved a leading key=value to overrides
    clients = cfg.partition.num_clients
    n = _positive(args.supernodes if args.supernodes is not None else clients, "--supernodes")
    if n > clients:
        raise UserError(
            f"--supernodes: {n} SuperNodes for {clients} client partitions (partition.num_clients)"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout: must be positive (got {args.timeout})")
    check_poll_interval(args.poll_interval, "--poll-interval")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is not a directory")
    if holds_run(out):
        raise UserError(f"--out: {out} already holds a run; choose another directory")
    app_dir = _default_app_dir()
    if not (app_dir / "pyproject.toml").is_file():
        raise UserError(
            f"{app_dir}: not a checkout of fedhello (no pyproject.toml); "
            "`fedhello deploy local` needs one as the Flower app"
        )
    if n < clients:
        print(
            f"note: partitions {n}..{clients - 1} have no SuperNode; their clients will be missing",
            file=sys.stderr,
        )
    # a fresh deployment directory inside the run directory: certificates, keys, logs
    work = out / "deployment"
    k = 1
    while work.exists():
        k += 1
        work = out / f"deployment-{k}"
    work.mkdir(parents=True)
    config_path = work / "experiment.yaml"  # the processes need the config as a file
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"run directory: {out}", file=sys.stderr)
    print(f"deployment: {n} SuperNodes, logs in {work / 'logs'}", file=sys.stderr)
    try:
        with LocalDeployment(work, n, proxy=not args.no_proxy, poll_interval=args.poll_interval) as fed:
            log = fed.run(config_path, out, timeout=args.timeout)
    except KeyboardInterrupt:
        print("interrupted; every process of the deployment is stopped", file=sys.stderr)
        return 130
    except subprocess.TimeoutExpired:
        print(f"fedhello: error: the run took longer than --timeout {args.timeout:g} s", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"fedhello: error: {e}\nlogs: {work / 'logs'}", file=sys.stderr)
        return 1
    (work / "logs" / "run.log").write_text(log)
    print(out)
    return 0


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `deploy keys` and `deploy local` to a parser's subcommands (`func` is the handler)."""
    deploy = subparsers.add_parser(
        "deploy", help="set up a Flower federation: keys, or a local trial (docs/flower.md)"
    )
    actions = deploy.add_subparsers(dest="action", required=True)

    keys = actions.add_parser(
        "keys",
        help="write a CA, a SuperLink certificate and SuperNode key pairs (throw-away: valid 2 days)",
    )
    keys.add_argument("dir", metavar="DIR", help="directory for the files (made if missing)")
    keys.add_argument(
        "--supernodes", type=int, default=1, metavar="N", help="SuperNode key pairs, one per client partition"
    )
    keys.add_argument(
        "--host", default="127.0.0.1", help="the server's client-facing IP address, named by its certificate"
    )
    keys.add_argument("--port", type=int, default=9092, help="the proxy's client-facing port (proxy.conf)")
    keys.add_argument(
        "--superlink-port", type=int, default=9095, help="the SuperLink's port on 127.0.0.1 (proxy.conf)"
    )
    keys.set_defaults(func=cmd_deploy_keys)

    local = actions.add_parser(
        "local", help="run an experiment on a SuperLink and SuperNodes on 127.0.0.1 (TLS, node auth)"
    )
    local.add_argument("config", nargs="?", help="YAML config file (optional)")
    local.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. federation.rounds=2")
    local.add_argument(
        "--supernodes",
        type=int,
        default=None,
        metavar="N",
        help="SuperNodes, holding partitions 0..N-1 (default: partition.num_clients)",
    )
    local.add_argument(
        "--out", required=True, help="run directory; the deployment's files go to OUT/deployment"
    )
    local.add_argument(
        "--timeout", type=float, default=None, help="seconds the run may take (default: no limit)"
    )
    local.add_argument(
        "--no-proxy",
        action="store_true",
        help="no nginx in front of the SuperLink (its Control API is then reachable where the Fleet API is)",
    )
    local.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help=f"how often each SuperNode's SuperExec looks for a message to run (default {DEFAULT_POLL_INTERVAL:g})",
    )
    local.set_defaults(func=cmd_deploy_local)
