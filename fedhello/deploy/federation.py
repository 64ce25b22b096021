"""A Flower federation on this machine, secured as a real deployment: `LocalDeployment` starts a
SuperLink (behind the nginx proxy of proxy.py) and SuperNodes as separate processes on
loopback, with TLS and SuperNode authentication from self-made keys (certificates.py), runs an
experiment with `flwr run`, and stops every process it started by its process id when the
context ends, errors included.

    with LocalDeployment(work_dir, num_supernodes=3) as fed:
        fed.run(config_path, out_dir)          # flwr run . NAME --run-config ... --stream
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psutil

from fedhello.deploy.certificates import make_supernode_keys, make_tls_certificates, write_partition_keys
from fedhello.deploy.proxy import find_nginx, proxy_config
from fedhello.errors import UserError

__all__ = [
    "CLIENT_FACING_HOST",
    "DEFAULT_POLL_INTERVAL",
    "FEDERATION",
    "LocalDeployment",
    "check_poll_interval",
    "default_app_dir",
]

FEDERATION = "fedhello-local"
"""The federation name `LocalDeployment` writes into its `flwr` configuration."""

SUPERLINK_START_SECONDS = 60.0  # the most a SuperLink may take to open its port
PROXY_START_SECONDS = 30.0  # the most the nginx proxy may take to open its port
PORT_POLL_SECONDS = 0.2  # how often a starting process's port is tried
CONTROL_TIMEOUT_SECONDS = 60  # the most an operator's `flwr supernode ...` command may take
RUN_TIMEOUT_SECONDS = 900  # the default limit of `flwr run` (LocalDeployment.run, run_app)
STOP_GRACE_SECONDS = 10  # how long stopping processes get to exit (then, once killed, to go)
REAP_SECONDS = 1  # how long `stop` waits to reap each process it started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_app_dir() -> Path:
    """The checkout this module is in: the Flower app (its pyproject.toml declares it)."""
    return Path(__file__).resolve().parents[2]


def _bin(name: str) -> str:
    """A Flower command from this Python's environment."""
    return str(Path(sys.executable).parent / name)


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
        self.app_dir = (app_dir or default_app_dir()).resolve()
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
        self.warm = warm  # SuperNodes fork ClientApps from a warm process (fedhello/flower/warm.py)
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
                f'#!/bin/sh\nexec "{sys.executable}" -c "from fedhello.flower.warm import main; main()" "$@"\n'
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

    def start(self) -> Self:
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
        self._wait_for_port(self.superlink, "127.0.0.1", self.port, SUPERLINK_START_SECONDS)
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
        self._wait_for_port(self.proxy_proc, CLIENT_FACING_HOST, self.proxy_port, PROXY_START_SECONDS)

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
        self._flwr(["supernode", "register", str(public_key), connection], timeout=CONTROL_TIMEOUT_SECONDS)

    def unregister(self, node_id: int) -> None:
        """`flwr supernode unregister`: remove a SuperNode; its key no longer connects."""
        self._flwr(["supernode", "unregister", str(node_id), FEDERATION], timeout=CONTROL_TIMEOUT_SECONDS)

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
        program = proc.args[0] if isinstance(proc.args, (list, tuple)) else proc.args
        name = Path(str(program)).name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {self.work / 'logs'}")
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(PORT_POLL_SECONDS)
        raise RuntimeError(f"{name} did not open {host}:{port} within {timeout:.0f} s")

    # -- runs --------------------------------------------------------------------------------
    def run(
        self,
        config_path: Path,
        out_dir: Path,
        *,
        resume: bool = False,
        timeout: float | None = RUN_TIMEOUT_SECONDS,
    ) -> str:
        """`flwr run` the app with this config into out_dir; returns the streamed log.

        Raises RuntimeError when `flwr run` fails and subprocess.TimeoutExpired after `timeout`
        seconds (None: no limit).
        """
        run_config = f"config-path='{config_path.resolve()}' out-dir='{out_dir.resolve()}' resume={str(resume).lower()}"
        if self.partition_keys is not None:
            run_config += f" partition-keys='{self.partition_keys}'"
        return self.run_app(run_config, timeout=timeout)

    def run_app(self, run_config: str, *, timeout: float | None = RUN_TIMEOUT_SECONDS) -> str:
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
        _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_SECONDS)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=STOP_GRACE_SECONDS)
        for root in roots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                root.wait(timeout=REAP_SECONDS)  # reap
        for log in self._logs:
            log.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
