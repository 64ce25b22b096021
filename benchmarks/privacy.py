"""Privacy against utility: final accuracy and epsilon of Fed-HeLLo, FedIT and FedRA under central
differential privacy, at epsilon in {inf, 8, 4, 1} (delta = 1/N), on a federation of 200 clients.

    .venv/bin/python benchmarks/privacy.py [--jobs 2] [--out benchmarks/results/privacy]

The federation: the reference config (offline MiniLM, 6 blocks, Wikipedia vital articles, 11
topics; groups 1:1:1 with layer budgets 3/4/6) split over 200 IID clients (38 examples each),
20 expected per round (q = 0.1, Poisson sampling under DP), 10 rounds of 2 local steps, LoRA
rank 8, the whole update clipped to C = 1 (about a third of a typical client's update norm here:
the median was 3.15 over 8 clients of round 1). Why this size: DP-FedAvg's noise on a mean of m
clients has standard deviation z C / m per coordinate, so it needs many clients per round; 200
clients of 38 texts each use the 7,633 training texts with a partition large enough for a few
batches, and 20 per round keep a run within minutes on 2 CPU cores (a bigger federation is the
obvious next measurement). "inf" (no noise) is the "none" row: the run without any privacy
machinery, with fedhello's usual sampling of exactly 20 clients.

Runs go to runs/privacy/<method>_eps<e>/ (resumed when interrupted); each finished run's summary
is copied to OUT/<method>_eps<e>.json (committed), and a run whose summary is there is skipped.
The table (Markdown, as docs/privacy.md shows it) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("fedhello", "fedit", "fedra")
EPSILONS = ("none", "8", "4", "1")
CLIENTS = 200
BASE = [
    "partition.num_clients=200",
    "federation.clients_per_round=20",
    "federation.rounds=10",
    "train.local_steps=2",
    "lora.r=8",
    "eval.every=5",
    "quiet=true",
    "threads=1",  # two runs at a time on two cores: one thread each
]


def overrides(epsilon: str) -> list[str]:
    if epsilon == "none":
        return []
    common = ["privacy.mode=central", "privacy.clip_norm=1.0", f"privacy.delta={1 / CLIENTS}"]
    return [*common, f"privacy.target_epsilon={epsilon}"]


def run(method: str, epsilon: str, out: Path) -> Path:
    result = out / f"{method}_eps{epsilon}.json"
    run_dir = Path("runs/privacy") / result.stem
    if result.is_file():
        return result
    cmd = [sys.executable, "-m", "fedhello", "run"]
    if (run_dir / "checkpoint").is_dir():  # an interrupted run continues with its saved config
        cmd += ["--resume", "--out", str(run_dir)]
    else:
        config = ["benchmarks/configs/reference.yaml", *BASE, f"method={method}", *overrides(epsilon)]
        cmd += [*config, "--out", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    result.write_text((run_dir / "summary.json").read_text())
    print(f"{result}: done", flush=True)
    return result


def table(out: Path) -> str:
    lines = [
        "| method | epsilon target | epsilon spent (delta 1/200) | noise multiplier z | final test accuracy |",
        "|---|---|---|---|---|",
    ]
    baseline = None
    for method in METHODS:
        for eps in EPSILONS:
            path = out / f"{method}_eps{eps}.json"
            if not path.is_file():
                continue
            s = json.loads(path.read_text())
            baseline = s.get("majority_class_test_accuracy", baseline)
            p = s.get("privacy") or {}
            spent = "-" if not p else f"{p['epsilon']:.3g}"
            z = "-" if not p else f"{p['noise_multiplier']:.3g}"
            target = {"none": "inf (no DP)"}.get(eps, eps)
            lines.append(f"| {method} | {target} | {spent} | {z} | {s['final_test_accuracy']:.3f} |")
    if baseline is not None:
        lines.append(f"\nMajority-class test accuracy: {baseline:.3f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/privacy")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(m, e) for e in EPSILONS for m in METHODS]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cell: run(*cell, out), cells))
    print(table(out))


if __name__ == "__main__":
    main()
