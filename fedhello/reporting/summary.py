"""From per-round records to the run's summary: final and late-round accuracy, not best-on-test."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from records (used on resume: the checkpoint's history is the truth)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def summarize(
    records: Sequence[dict[str, Any]], *, method: str, group_names: Sequence[str], wall_seconds: float
) -> dict[str, Any]:
    """The run's headline numbers. Model selection uses validation, never test."""
    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    tests = [r["test_accuracy"] for r in evaluated]
    last_round = records[-1]["round"] if records else 0
    # the evaluations of the last five rounds (all five when evaluating every round)
    late = [r["test_accuracy"] for r in evaluated if r["round"] > last_round - 5] or tests[-1:]
    best = max(evaluated, key=lambda r: (r["val_accuracy"], -r["round"]), default=None)
    peak: dict[str, int] = {g: 0 for g in group_names}
    seconds: dict[str, list[float]] = {g: [] for g in group_names}
    for r in records:
        for c in r["clients"]:
            peak[c["group"]] = max(peak[c["group"]], int(c["peak_memory_bytes"]))
            if c["steps"]:
                seconds[c["group"]].append(c["seconds"] / c["steps"])
    train = sum(r["train_seconds"] for r in records)
    evals = sum(r.get("eval_seconds", 0.0) for r in records)
    fisher = sum(r["fisher"]["seconds"] for r in records if "fisher" in r)
    rounds = sum(r.get("round_seconds", 0.0) for r in records)
    return {
        "method": method,
        "rounds_completed": len(records),
        "final_test_accuracy": tests[-1] if tests else None,
        "mean_last5_test_accuracy": float(np.mean(late)) if late else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_val_round": best["round"] if best else None,
        "test_accuracy_at_best_val": best["test_accuracy"] if best else None,
        "final_val_accuracy": evaluated[-1]["val_accuracy"] if evaluated else None,
        "bytes_uploaded_total": int(sum(r["bytes_up"] for r in records)),
        "bytes_downloaded_total": int(sum(r["bytes_down"] for r in records)),
        "peak_memory_bytes_by_group": peak,
        "step_seconds_median_by_group": {g: float(np.median(v)) if v else None for g, v in seconds.items()},
        "rejected_updates": int(sum(len(r.get("rejected", {})) for r in records)),
        "client_train_seconds": train,
        "eval_seconds": evals,
        "fisher_seconds": fisher,
        "fisher_refreshes": sum(1 for r in records if "fisher" in r),
        "framework_overhead_fraction": (rounds - train - evals - fisher) / rounds if rounds > 0 else None,
        "wall_seconds": wall_seconds,
    }
