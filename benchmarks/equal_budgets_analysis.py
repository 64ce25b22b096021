"""Why does Fed-HeLLo lose at equal device budgets? Measured from a grid's committed cells.

    .venv/bin/python benchmarks/equal_budgets_analysis.py [GRID] [--roc 1:1:1]

Prints Markdown (docs/results.md, "At equal device budgets"):
1. the realised per-layer training frequency of each group (fraction of the group's client-rounds
   that trained each block), per method, pooled over seeds;
2. Fed-HeLLo's Fisher probabilities, averaged over its refreshes, and the same restricted to the
   blocks each group may train (renormalised), with how far from uniform that restriction is
   (normalised entropy: 1 = uniform; largest / smallest probability);
3. the test accuracy at every evaluated round (mean over seeds): the warm-up is round 1 (W = 10%
   of 10 rounds), so every later round samples from Fisher probabilities;
4. how many different layer sets each group's clients trained, and how often a block was
   trained at all (a short run spreads few updates over many sets).
GRID defaults to benchmarks/results/equal-budgets-minilm.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.grid import load_cells

METHODS = (
    "fedhello",
    "fedhello-feasible",
    "fedhello-refresh-half",
    "fedhello-persist",
    "fed-pilot",
    "fedra",
    "gd-inverted_triangle",
    "straggler",
)


def lowest_block(allowed: str, count: int) -> int | None:
    """The lowest block a set of `count` layers may start at, from the summary's budget text
    ('up to 3 layers: 3 from block 2, 2 from block 2, ...')."""
    for n, block in re.findall(r"(\d+) from block (\d+)", allowed):
        if int(n) == count:
            return int(block)
    return None


def frequency_table(cells: list[dict[str, Any]], groups: list[str], num_layers: int) -> list[str]:
    lines = [
        "| method | group | " + " | ".join(f"block {i}" for i in range(num_layers)) + " | distinct sets |"
    ]
    lines.append("|---" * (num_layers + 3) + "|")
    for method in METHODS:
        mine = [c for c in cells if c["cell"]["method"] == method]
        if not mine:
            continue
        for g in groups:
            counts, total, sets = np.zeros(num_layers), 0, set()
            for c in mine:
                for r in c["rounds"]:
                    for cl in r.clients:
                        if cl.group == g and cl.steps:
                            counts[list(cl.layers)] += 1
                            total += 1
                            sets.add(tuple(cl.layers))
            if total:
                row = " | ".join(f"{x:.2f}" for x in counts / total)
                lines.append(f"| {method} | {g} | {row} | {len(sets)} |")
    return lines


def fisher_table(cells: list[dict[str, Any]], groups: list[str], num_layers: int) -> list[str]:
    mine = [c for c in cells if c["cell"]["method"] == "fedhello"]
    refreshes = [r.extras["fisher"] for c in mine for r in c["rounds"] if "fisher" in r.extras]
    if not refreshes:
        return ["(no Fisher refreshes recorded in these cells)"]
    probs = np.array([f["probabilities"] for f in refreshes])
    levels = np.array([f["levels"] for f in refreshes if f["levels"]])
    summary = mine[0]["summary"]
    lines = [
        f"{len(refreshes)} refreshes over {len(mine)} runs. Mean probability per block (all blocks): "
        + ", ".join(f"{x:.3f}" for x in probs.mean(axis=0))
        + f"; mean importance level per block: {', '.join(f'{x:.2f}' for x in levels.mean(axis=0))}.",
        "",
        "| group | blocks it may train | mean restricted probabilities | normalised entropy | largest / smallest "
        "| refreshes whose allowed blocks share one level |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        budget = summary.groups[g]["budget"]
        allowed_text = (summary.budgets or {}).get(g, {}).get("allowed", "")
        low = lowest_block(allowed_text, int(budget)) if allowed_text else 0
        if low is None:
            lines.append(f"| {g} | none ({allowed_text}) | - | - | - | - |")
            continue
        restricted = probs[:, low:] / probs[:, low:].sum(axis=1, keepdims=True)
        entropy = -(restricted * np.log(restricted)).sum(axis=1) / math.log(restricted.shape[1])
        ratio = restricted.max(axis=1) / restricted.min(axis=1)
        one_level = sum(len(set(lv[low:])) == 1 for lv in levels)
        lines.append(
            f"| {g} | {low}-{num_layers - 1} | {', '.join(f'{x:.3f}' for x in restricted.mean(axis=0))} "
            f"| {entropy.mean():.3f} (min {entropy.min():.3f}) | {np.median(ratio):.2f} (median) "
            f"| {one_level} of {len(levels)} |"
        )
    return lines


def curve_table(cells: list[dict[str, Any]]) -> list[str]:
    by_round: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        for r in c["rounds"]:
            value = r.metric("test")
            if value is not None:
                by_round[c["cell"]["method"]][r.round].append(value)
    rounds = sorted({r for m in by_round.values() for r in m})
    lines = [
        "| method | " + " | ".join(f"round {r}" for r in rounds) + " |",
        "|---" * (len(rounds) + 1) + "|",
    ]
    for method in METHODS:
        if method in by_round:
            vals = " | ".join(f"{np.mean(by_round[method][r]):.3f}" for r in rounds)
            lines.append(f"| {method} | {vals} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", default="benchmarks/results/equal-budgets-minilm")
    parser.add_argument("--roc", default="1:1:1")
    args = parser.parse_args()
    cells = [c for c in load_cells(Path(args.grid)) if c["cell"]["roc"] == args.roc]
    if not cells:
        raise SystemExit(f"{args.grid}: no cells with client ratio {args.roc}")
    summary = cells[0]["summary"]
    groups, num_layers = list(summary.groups), summary.num_layers
    for setting in sorted({c["cell"]["setting"] for c in cells}):
        mine = [c for c in cells if c["cell"]["setting"] == setting]
        print(f"## {setting}, clients {args.roc}\n")
        print("### Realised per-layer training frequency per group\n")
        print("\n".join(frequency_table(mine, groups, num_layers)) + "\n")
        print("### Fed-HeLLo's Fisher probabilities, restricted to what each group may train\n")
        print("\n".join(fisher_table(mine, groups, num_layers)) + "\n")
        print("### Test accuracy per evaluated round (mean over seeds)\n")
        print("\n".join(curve_table(mine)) + "\n")


if __name__ == "__main__":
    main()
