"""What Flower costs per round, and how much of it is fedhello's (docs/flower.md, "Cost").

One experiment four ways, on this machine, one after another:
1. the in-process engine;
2. Flower's simulation engine;
3. a Flower deployment as `fedhello deploy local` makes it (SuperLink behind the nginx proxy,
   TLS, node authentication, partitions bound to keys, one SuperNode per client partition);
4. Flower's floor: the same deployment running a no-op app (benchmarks/flower_noop/) that sends
   the same number of messages per round to as many nodes, whose ClientApp imports torch and
   replies at once.

Per engine: start-up (everything before round 1) and the median round. For the deployment:
its overhead per round = round - evaluation - Fisher scoring - the slowest client's training,
fedhello's own share = that overhead - the no-op app's round, and where it went (medians over
client-rounds): a ClientApp's start-up and imports beyond the no-op's (process age at the
message, minus the no-op ClientApp's), setup (model and data), building the reply, and the rest
(messages waiting and moving between processes); the training itself is reported beside it.

    python benchmarks/flower_overhead.py                # the default experiment (threads=1)
    python benchmarks/flower_overhead.py --small        # 3 clients, 3 rounds, 32 tokens
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedhello import load_config
from fedhello.deploy.federation import DEFAULT_POLL_INTERVAL, LocalDeployment
from fedhello.records import read_records

NOOP_APP = Path(__file__).with_name("flower_noop")
DEFAULT = ["threads=1", "quiet=true"]
SMALL = [
    *DEFAULT,
    "model.max_length=32",
    "data.val_size=100",
    "data.test_size=300",
    "partition.num_clients=3",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "train.local_steps=4",
]


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def rounds_of(name: str, run_dir: Path, total: float, infrastructure: float = 0.0) -> dict[str, Any]:
    records = read_records(run_dir / "metrics.jsonl")
    rounds = [r.round_seconds or 0.0 for r in records]
    slowest = [max((c.seconds for c in r.clients), default=0.0) for r in records]
    fixed = [(r.eval_seconds or 0.0) + r.extra_seconds for r in records]
    overhead = [w - s - f for w, s, f in zip(rounds, slowest, fixed, strict=True)]
    out: dict[str, Any] = {
        "engine": name,
        "total_seconds": total + infrastructure,
        "infrastructure_startup_seconds": infrastructure,
        "run_startup_seconds": total - sum(rounds),
        "round_seconds_median": _median(rounds),
        "slowest_client_train_seconds_median": _median(slowest),
        "eval_and_fisher_seconds_median": _median(fixed),
        "overhead_seconds_median": _median(overhead),
        "overhead_seconds_per_round": overhead,
        "final_test_metric": records[-1].metric("test"),
    }
    timings = [c.timings for r in records for c in r.clients if c.timings]
    if timings:
        out["clientapp_seconds_median"] = {k: _median([t[k] for t in timings]) for k in timings[0]}
    return out


def noop_rounds(fed: LocalDeployment, rounds: int, clients: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    fed.run_app(f"rounds={rounds} clients={clients} out='{out}'", timeout=1800)
    total = time.perf_counter() - start
    data = json.loads(out.read_text())
    seconds = [r["seconds"] for r in data]
    return {
        "engine": "no-op app (Flower's floor)",
        "total_seconds": total + fed.startup_seconds,
        "infrastructure_startup_seconds": fed.startup_seconds,
        "run_startup_seconds": total - sum(seconds),
        "round_seconds_median": _median(seconds),
        "round_seconds": seconds,
        "replies": [r["replies"] for r in data],
        "clientapp_process_age_median": _median([a for r in data for a in r["process_ages"]]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--small", action="store_true", help="3 clients, 3 rounds (a quick look)")
    parser.add_argument("--out", default="runs/flower-bench")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        help="SuperExec's task poll interval in the deployments, seconds (LocalDeployment's default)",
    )
    parser.add_argument(
        "--skip-single-machine-engines",
        action="store_true",
        help="only the deployment and the no-op app (a quick look; no simulation ratio)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = load_config(overrides=[*(SMALL if args.small else DEFAULT), *args.overrides])
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    fh = [sys.executable, "-m", "fedhello", "run", str(cfg_path)]
    results = []

    if not args.skip_single_machine_engines:
        start = time.perf_counter()
        subprocess.run([*fh, "--out", str(out / "local")], check=True, stdout=subprocess.DEVNULL)
        results.append(rounds_of("in-process", out / "local", time.perf_counter() - start))

        start = time.perf_counter()
        subprocess.run(
            [*fh, "engine=flower", "--out", str(out / "simulation")],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        results.append(rounds_of("flower simulation", out / "simulation", time.perf_counter() - start))

    nodes = cfg.partition.num_clients
    with LocalDeployment(out / "deployment", nodes, poll_interval=args.poll_interval) as fed:
        start = time.perf_counter()
        fed.run(cfg_path, out / "deployed", timeout=3600)
        deployed = rounds_of(
            "flower deployment", out / "deployed", time.perf_counter() - start, fed.startup_seconds
        )
    results.append(deployed)
    with LocalDeployment(
        out / "noop-deployment", nodes, app_dir=NOOP_APP, poll_interval=args.poll_interval
    ) as fed:
        noop = noop_rounds(fed, cfg.federation.rounds, cfg.federation.clients_per_round, out / "noop.json")
    results.append(noop)

    own = deployed["overhead_seconds_median"] - noop["round_seconds_median"]
    # Flower's Grid looks for replies every 3 s, so round times cluster 3 s apart and a median can
    # land in either cluster: the means over rounds 2 on (round 1 also finds the nodes) as well
    later = deployed["overhead_seconds_per_round"][1:], noop["round_seconds"][1:]
    own_mean = float(np.mean(later[0]) - np.mean(later[1])) if all(later) else float("nan")
    rounds = {r["engine"]: r["round_seconds_median"] for r in results}
    ratio = rounds.get("flower simulation", float("nan")) / rounds.get("in-process", float("nan"))
    t = deployed.get("clientapp_seconds_median", {})
    breakdown = {
        "imports_beyond_noop": t.get("process-age", float("nan")) - noop["clientapp_process_age_median"],
        "setup_model_and_data": t.get("setup", float("nan")),
        "training": t.get("train", float("nan")),
        "building_the_reply": t.get("serialise", float("nan")),
    }
    # what the ClientApp does not account for: messages waiting and moving between the processes
    breakdown["the_rest_waiting_and_transfers"] = own - (
        breakdown["imports_beyond_noop"] + breakdown["setup_model_and_data"] + breakdown["building_the_reply"]
    )
    summary = {
        "experiment": "small" if args.small else "default",
        "overrides": [*(SMALL if args.small else DEFAULT), *args.overrides],
        "superexec_poll_interval_seconds": args.poll_interval,
        "fedhello_own_overhead_seconds_per_round": own,
        "fedhello_own_overhead_seconds_per_round_mean_from_round_2": own_mean,
        "simulation_round_over_in_process_round": ratio,
        "clientapp_breakdown_seconds_median": breakdown,
        "engines": results,
    }
    print(
        "| engine | total s | start-up s (infrastructure + run) | round s (median) | slowest client's training s | eval + Fisher s | overhead s/round |"
    )
    print("|---" * 7 + "|")
    for r in results:
        print(
            f"| {r['engine']} | {r['total_seconds']:.1f} | {r['infrastructure_startup_seconds']:.1f} + "
            f"{r['run_startup_seconds']:.1f} | {r['round_seconds_median']:.2f} "
            f"| {r.get('slowest_client_train_seconds_median', float('nan')):.2f} "
            f"| {r.get('eval_and_fisher_seconds_median', float('nan')):.2f} "
            f"| {r.get('overhead_seconds_median', float('nan')):.2f} |"
        )
    print(
        f"\nfedhello's own deployment overhead per round (overhead - no-op round): {own:.2f} s "
        f"(medians); {own_mean:.2f} s (means over rounds 2 on)"
    )
    print(f"simulation round / in-process round (medians): {ratio:.2f}")
    print(
        "a deployed ClientApp's time per message (medians): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items())
    )
    scores = {r["engine"]: r["final_test_metric"] for r in results if "final_test_metric" in r}
    print(f"final test scores: {scores}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
