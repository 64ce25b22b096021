"""What Flower costs: one small experiment on the in-process engine, Flower's simulation
engine and a Flower deployment (SuperLink + one SuperNode per client, separate processes,
TLS and node authentication), with start-up separated from the rounds.

    python benchmarks/flower_overhead.py [--out runs/flower-bench] [dotted.key=value ...]

Per engine it prints the whole wall time, the start-up (everything before round 1: for the
deployment, starting the SuperLink and SuperNodes, then installing the app and starting the
ServerApp), and per round: wall time, the clients' pure training time (sum over clients of
their local training seconds, as each client measured it), evaluation time, and the overhead
= round wall - evaluation - clients' training. On the in-process engine clients train one
after another; on Flower they can overlap, which can make the overhead negative.
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
from fedhello.deploy import LocalDeployment
from fedhello.records import read_records

DEFAULTS = [
    "model.name=minilm",
    "model.max_length=32",
    "data.val_size=100",
    "data.test_size=300",
    "partition.num_clients=3",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "train.local_steps=4",
    "eval.every=1",
    "threads=1",
    "quiet=true",
    "method=fedhello",
    "groups=[{name: low, share: 1, budget: 0.5}, {name: mid, share: 1, budget: 0.75}, {name: high, share: 1, budget: 1.0}]",
]


def measure(name: str, run_dir: Path, total: float, infrastructure: float = 0.0) -> dict[str, Any]:
    records = read_records(run_dir / "metrics.jsonl")
    rounds = [r.round_seconds or 0.0 for r in records]
    train = [r.train_seconds for r in records]
    evals = [r.eval_seconds or 0.0 for r in records]
    fisher = [r.fisher["seconds"] if r.fisher is not None else 0.0 for r in records]
    overhead = [w - t - e - f for w, t, e, f in zip(rounds, train, evals, fisher, strict=True)]
    return {
        "engine": name,
        "total_seconds": total + infrastructure,
        "infrastructure_startup_seconds": infrastructure,
        "run_startup_seconds": total - sum(rounds),
        "round_seconds_median": float(np.median(rounds)),
        "round_seconds_first": rounds[0],
        "client_train_seconds_median": float(np.median(train)),
        "eval_seconds_median": float(np.median(evals)),
        "overhead_seconds_median": float(np.median(overhead)),
        "overhead_seconds_first_round": overhead[0],
        "final_test_accuracy": records[-1].get("test_accuracy"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default="runs/flower-bench")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = load_config(overrides=[*DEFAULTS, *args.overrides])
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    fh = [sys.executable, "-m", "fedhello", "run", str(cfg_path)]
    results = []

    start = time.perf_counter()
    subprocess.run([*fh, "--out", str(out / "local")], check=True, stdout=subprocess.DEVNULL)
    results.append(measure("in-process", out / "local", time.perf_counter() - start))

    start = time.perf_counter()
    subprocess.run(
        [*fh, "engine=flower", "--out", str(out / "simulation")],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results.append(measure("flower simulation", out / "simulation", time.perf_counter() - start))

    with LocalDeployment(out / "deployment", cfg.partition.num_clients) as fed:
        start = time.perf_counter()
        fed.run(cfg_path, out / "deployed", timeout=1800)
        results.append(
            measure("flower deployment", out / "deployed", time.perf_counter() - start, fed.startup_seconds)
        )

    same = {r["final_test_accuracy"] for r in results}
    print(
        "| engine | total s | infrastructure start-up s | run start-up s | round s (median) | first round s "
        "| clients' training s/round | eval s/round | overhead s/round (median) | overhead, first round |"
    )
    print("|---" * 10 + "|")
    for r in results:
        print(
            f"| {r['engine']} | {r['total_seconds']:.1f} | {r['infrastructure_startup_seconds']:.1f} "
            f"| {r['run_startup_seconds']:.1f} | {r['round_seconds_median']:.2f} | {r['round_seconds_first']:.2f} "
            f"| {r['client_train_seconds_median']:.2f} | {r['eval_seconds_median']:.2f} "
            f"| {r['overhead_seconds_median']:.2f} | {r['overhead_seconds_first_round']:.2f} |"
        )
    print(
        f"\nfinal test accuracy: {sorted(same)} ({'identical' if len(same) == 1 else 'DIFFERENT'} across engines)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
