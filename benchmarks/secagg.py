"""What secure aggregation costs on the default experiment, in process: round time with and
without it (median of rounds, the two runs side by side), the protocol's extra messages and
bytes per round, and the final accuracy of both (docs/privacy.md).

    .venv/bin/python benchmarks/secagg.py [--out benchmarks/results/secagg.json] [--threads 1] [--seeds 3] [--deployed]

Both runs use the default config (offline MiniLM) with seed 0, and run at the same time (one thread
each) so that both meet the same load; seeds 1.. add their final accuracies. Runs go to
runs/secagg/{plain,secure}-seed<N> and are resumed when interrupted. The protocol's figures are what
`secure_round` counted: every key, share, masked input and unmasking message, as the bytes a
network would carry (each limb of a masked tensor is int64: with the default two limbs, four
times a float32 update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedhello.records import read_records

SECURE = "secure_aggregation.enabled=true"


def run(name: str, overrides: list[str], threads: int) -> Path:
    out = Path("runs/secagg") / name
    if (out / "summary.json").is_file():
        return out
    cmd = [sys.executable, "-m", "fedhello", "run"]
    if (out / "checkpoint").is_dir():
        cmd += ["--resume", "--out", str(out)]
    else:
        cmd += [*overrides, f"threads={threads}", "quiet=true", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{out}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return out


def figures(out: Path) -> dict[str, Any]:
    records = read_records(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    secure = [r.extras["secure_aggregation"] for r in records if "secure_aggregation" in r.extras]
    return {
        "median_round_seconds": statistics.median(r.round_seconds for r in records if r.round_seconds),
        "final_test_accuracy": summary["final_test_accuracy"],
        "bytes_uploaded_per_round": statistics.median(r.bytes_up for r in records),
        "protocol_messages_per_round": statistics.median(s["messages"] for s in secure) if secure else 0,
        "protocol_bytes_per_round": statistics.median(s["bytes"] for s in secure) if secure else 0,
        "protocol_seconds_per_round": statistics.median(s["seconds"] for s in secure) if secure else 0.0,
    }


def deployed(out: Path) -> dict[str, Any]:
    """The small experiment of benchmarks/flower_overhead.py (3 clients, 3 rounds) on a local
    deployment (TLS, node authentication, one SuperNode per client), without and with secure
    aggregation: median rounds and the protocol's three message rounds, stage by stage."""
    sys.path.insert(0, str(Path(__file__).parent))
    import yaml
    from flower_overhead import SMALL

    from fedhello import load_config
    from fedhello.deploy.federation import LocalDeployment

    figures_by_run = {}
    for name, extra in [("plain", []), ("secure", [SECURE])]:
        cfg = load_config(overrides=[*SMALL, *extra])
        work = (out / f"deployed-{name}").resolve()
        work.mkdir(parents=True, exist_ok=True)
        cfg_path = work / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with LocalDeployment(work / "deployment", cfg.partition.num_clients) as fed:
            fed.run(cfg_path, work / "run", timeout=3600)
        records = read_records(work / "run" / "metrics.jsonl")
        later = records[1:]  # round 1 also finds the nodes
        stages = [r.extras.get("secure_aggregation", {}) for r in later]
        figures_by_run[name] = {
            "median_round_seconds": statistics.median(r.round_seconds for r in later),
            "stage_seconds_median": {
                stage: statistics.median(s[f"{stage}_seconds"] for s in stages)
                for stage in ("share", "input", "unmask")
                if all(f"{stage}_seconds" in s for s in stages) and stages
            },
            "protocol_messages_per_round": statistics.median(s.get("messages", 0) for s in stages),
            "protocol_bytes_per_round": statistics.median(s.get("bytes", 0) for s in stages),
        }
    return figures_by_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/secagg.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--deployed", action="store_true", help="also the small experiment on a local deployment"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final-accuracy comparison")
    args = parser.parse_args()
    with ThreadPoolExecutor(2) as pool:  # side by side: both runs meet the same load
        runs = list(
            pool.map(lambda a: run(*a, args.threads), [("plain-seed0", []), ("secure-seed0", [SECURE])])
        )
    plain, secure = figures(runs[0]), figures(runs[1])
    result: dict[str, Any] = {
        "plain": plain,
        "secure": secure,
        "round_time_ratio": secure["median_round_seconds"] / plain["median_round_seconds"],
        "accuracy_difference": secure["final_test_accuracy"] - plain["final_test_accuracy"],
    }
    # further seeds: the final accuracy only (the runs' layer sets part ways after a few rounds)
    by_seed = {0: (plain["final_test_accuracy"], secure["final_test_accuracy"])}
    for seed in range(1, args.seeds):
        with ThreadPoolExecutor(2) as pool:
            pair = list(
                pool.map(
                    lambda a: run(*a, args.threads),
                    [
                        (f"plain-seed{seed}", [f"seed={seed}"]),
                        (f"secure-seed{seed}", [f"seed={seed}", SECURE]),
                    ],
                )
            )
        by_seed[seed] = (figures(pair[0])["final_test_accuracy"], figures(pair[1])["final_test_accuracy"])
    result["final_test_accuracy_by_seed"] = {
        str(k): {"plain": a, "secure": b} for k, (a, b) in by_seed.items()
    }
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if "deployed" in previous and not args.deployed:
        result["deployed"] = previous["deployed"]
    if args.deployed:
        result["deployed"] = deployed(Path("runs/secagg"))
        d = result["deployed"]
        print(
            f"deployed, small experiment: median round {d['plain']['median_round_seconds']:.2f} s plain, "
            f"{d['secure']['median_round_seconds']:.2f} s secure; the stages "
            + ", ".join(f"{k} {v:.2f} s" for k, v in d["secure"]["stage_seconds_median"].items())
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median round: {plain['median_round_seconds']:.2f} s plain, {secure['median_round_seconds']:.2f} s "
        f"secure (x{result['round_time_ratio']:.3f}); the protocol: {secure['protocol_messages_per_round']:g} "
        f"messages, {secure['protocol_bytes_per_round'] / 2**20:.2f} MiB, "
        f"{secure['protocol_seconds_per_round']:.3f} s per round (plain upload "
        f"{plain['bytes_uploaded_per_round'] / 2**20:.2f} MiB); final accuracy {plain['final_test_accuracy']:.3f} "
        f"plain, {secure['final_test_accuracy']:.3f} secure"
    )
    for seed, (a, b) in by_seed.items():
        print(f"seed {seed}: final accuracy {a:.3f} plain, {b:.3f} secure ({b - a:+.3f})")


if __name__ == "__main__":
    main()
