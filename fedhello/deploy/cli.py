"""`fedhello deploy`: the command line over certificates.py, proxy.py and federation.py
(`fedhello.cli` adds it with `add_deploy_commands`).

    fedhello deploy keys DIR [--supernodes N] [--host HOST]   # CA, server cert, N key pairs
    fedhello deploy local [CONFIG] [overrides ...] --out DIR  # the experiment on a local federation
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from pathlib import Path

from fedhello.deploy.certificates import make_supernode_keys, make_tls_certificates, write_partition_keys
from fedhello.deploy.federation import (
    DEFAULT_POLL_INTERVAL,
    LocalDeployment,
    check_poll_interval,
    default_app_dir,
)
from fedhello.deploy.proxy import proxy_config
from fedhello.errors import UserError

__all__ = ["add_deploy_commands", "cmd_deploy_keys", "cmd_deploy_local"]

DEFAULT_PROXY_PORT = 9092  # `deploy keys --port`: the proxy's client-facing port (proxy.conf)
DEFAULT_SUPERLINK_PORT = 9095  # `deploy keys --superlink-port`: the SuperLink's port behind the proxy
INTERRUPTED = 130  # the exit status of a run stopped with Ctrl-C (128 + SIGINT)


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
    app_dir = default_app_dir()
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
        return INTERRUPTED
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
    keys.add_argument(
        "--port", type=int, default=DEFAULT_PROXY_PORT, help="the proxy's client-facing port (proxy.conf)"
    )
    keys.add_argument(
        "--superlink-port",
        type=int,
        default=DEFAULT_SUPERLINK_PORT,
        help="the SuperLink's port on 127.0.0.1 (proxy.conf)",
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
