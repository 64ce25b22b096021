"""Run each method once on one config and print a table of accuracy and costs.

    python benchmarks/baselines.py --out runs/baselines                 # all methods, default config
    python benchmarks/baselines.py --methods fedhello,hetlora federation.rounds=20 --out runs/b20

Finished runs (a summary.json in OUT/<method>) are not recomputed, so an interrupted sweep
continues where it stopped; an unfinished one is resumed from its checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedhello.reporting.table import load_summary, summaries_table

METHODS = "fedhello,fedit,straggler,exclusive,fedra,hetlora,flexlora"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    methods = args.methods.split(",")
    for m in methods:
        run_dir = out / m
        if (run_dir / "summary.json").is_file():
            continue
        cmd = [sys.executable, "-m", "fedhello", "run"]
        if (run_dir / "checkpoint" / "state.json").is_file():
            cmd += ["--resume"]
        else:
            cmd += [*args.overrides, f"method={m}", "quiet=true"]
        subprocess.run([*cmd, "--out", str(run_dir)], check=True, stdout=subprocess.DEVNULL)
        print(f"{m}: done", file=sys.stderr)
    print(summaries_table([load_summary(out / m) for m in methods]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
