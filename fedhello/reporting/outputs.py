"""What a finished (or resumed) run leaves in its directory: summary.json and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhello.io import write_json_atomic
from fedhello.records import RoundRecord
from fedhello.reporting.plots import (
    layer_frequency,
    plot_fisher_scores,
    plot_layer_counts,
    plot_layer_heatmap,
    plot_metric,
)
from fedhello.reporting.summary import SUMMARY_SCHEMA, Summary, beats_baseline, summarize, summarize_budgets

if TYPE_CHECKING:
    from fedhello.engine.experiment import Experiment

BEFORE_TRAINING = "before_training.json"  # the metrics before round 1 (eval.before_training)


def group_budgets(exp: Experiment) -> dict[str, dict[str, Any]]:
    """Each budgeted group's budgets, what they allow (at its clients' most steps) and its members."""
    assert exp.costs is not None
    out = {}
    for i, g in enumerate(exp.groups):
        if not g.device_budget.constrained:
            continue
        limits = exp.costs.limits(g.device_budget, exp.group_steps(i))
        out[g.name] = {
            "memory": g.device_budget.memory,
            "seconds_per_round": g.device_budget.seconds_per_round,
            "upload": g.device_budget.upload,
            "speed": g.device_budget.speed,
            "allowed": limits.describe(),
            "members": [int(c) for c in (exp.client_group == i).nonzero()[0]],
        }
    return out


def write_outputs(exp: Experiment, run_dir: Path, records: list[RoundRecord], wall: float) -> dict[str, Any]:
    """Write summary.json and the plots; returns the summary.

    Next to the methods' scores the summary holds the task's trivial baseline on the test split
    (`<baseline>_test_<metric>`, e.g. `majority_class_test_accuracy`) and whether the final
    primary metric beats it (`beats_trivial_baseline`)."""
    task = exp.task
    names = [g.name for g in exp.groups]
    m = task.primary_metric
    summary = summarize(
        records,
        method=exp.cfg.method,
        group_names=names,
        wall_seconds=wall,
        primary_metric=m,
        higher_is_better=task.higher_is_better,
    )
    summary["task"] = task.name
    summary.update(task.summary_notes(exp.examples))  # e.g. pretrained: false, skipped_images
    baseline = exp.trivial_baseline("test")
    summary["trivial_baseline"] = {"name": task.trivial_baseline_name, "test": baseline}
    for metric, value in baseline.items():
        summary[f"{task.trivial_baseline_name}_test_{metric}"] = value
    summary["beats_trivial_baseline"] = beats_baseline(
        summary[f"final_test_{m}"], baseline.get(m), task.higher_is_better
    )
    before = run_dir / BEFORE_TRAINING
    if before.is_file():
        summary["before_training"] = json.loads(before.read_text())["metrics"]
        for metric, value in summary["before_training"].get("test", {}).items():
            summary[f"before_training_test_{metric}"] = value
    fed = exp.cfg.federation
    summary["aggregation"] = {
        "rule": fed.aggregation,
        "norm_bound": fed.norm_bound,
        "rejected_updates": sum(len(r.rejected) for r in records),
    }
    if exp.privacy is not None:  # what the run spent, at the rounds it completed (docs/privacy.md)
        summary["privacy"] = exp.privacy.describe(len(records))
    summary["num_layers"] = exp.num_layers
    summary["groups"] = {g.name: {"share": g.share, "budget": g.budget} for g in exp.groups}
    if exp.costs is not None:
        summary["budgets"] = summarize_budgets(records, group_budgets(exp))
        sat_out = [g for g, b in summary["budgets"].items() if b["sat_out"]]
        if sat_out:
            summary["groups_sat_out"] = {g: summary["budgets"][g]["sat_out_reason"] for g in sat_out}
    summary = Summary.from_json({"summary_schema": SUMMARY_SCHEMA, **summary}).to_json()  # typed: checked
    write_json_atomic(run_dir / "summary.json", summary)
    title = f"{exp.cfg.method} (seed {exp.cfg.seed})" + ("" if task.pretrained else ", not pretrained")
    label = task.trivial_baseline_name.replace("_", " ")
    plot_metric(
        records,
        m,
        run_dir / f"{m}.png",
        title,
        baseline.get(m),
        label,
    )
    freq = layer_frequency(records, names, exp.num_layers)
    plot_layer_heatmap(freq, names, run_dir / "layer_frequency.png", f"{title}: layers trained per group")
    plot_layer_counts(
        records, exp.num_layers, run_dir / "layer_counts.png", f"{title}: realised training counts"
    )
    plot_fisher_scores(records, run_dir / "fisher_scores.png", f"{title}: Fisher layer scores")
    return summary
