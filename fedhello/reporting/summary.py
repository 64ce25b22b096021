"""From per-round records to the run's summary: final and late-round metrics, never best-on-test.

The keys follow the task's metrics: for the primary metric m (e.g. accuracy) the summary has
`final_test_m`, `mean_last5_test_m`, `best_val_m`, `best_val_round`, `test_m_at_best_val` and
`final_val_m`; every other metric of the task has `final_test_<metric>`. So a text
classification run keeps the keys users already read (`final_test_accuracy`) and adds
`final_test_macro_f1`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedhello.errors import UserError
from fedhello.records import RoundRecord

LATE_ROUNDS = 5  # "mean of the last rounds": the evaluations of the last five rounds
SUMMARY_SCHEMA = 2  # 1: files written before the typed Summary (no "summary_schema" key)
ScoreKind = Literal["final", "last5", "at_best_val"]
SCORE_LABELS: dict[ScoreKind, str] = {"final": "final", "last5": "last-5", "at_best_val": "at best val"}


class Summary(BaseModel):
    """A run's `summary.json`, typed: what `fedhello run` returns and writes, and what grids,
    reports and the CLI read.

    The file keeps its flat keys, named after the task's metrics (`final_test_accuracy`,
    `mean_last5_test_accuracy`, ...: see the module docstring); read those through `score` and
    `baseline_score`, which know the names, never by building keys. Fields added later have
    defaults, so older files read; keys this version does not know are kept as they are."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: int = Field(1, alias="summary_schema")
    method: str
    task: str = "text-classification"
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    rounds_completed: int = 0
    wall_seconds: float = 0.0
    pretrained: bool | None = None
    num_layers: int = 0
    groups: dict[str, dict[str, int | float]] = Field(default_factory=dict)  # name -> share, budget
    peak_memory_bytes_by_group: dict[str, int] = Field(default_factory=dict)
    step_seconds_median_by_group: dict[str, float | None] = Field(default_factory=dict)
    bytes_uploaded_total: int = 0
    bytes_downloaded_total: int = 0
    client_train_seconds: float = 0.0
    aggregation: dict[str, Any] = Field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] | None = None
    privacy: dict[str, Any] | None = None  # mode, clip_norm, noise_multiplier, delta, epsilon spent
    trivial_baseline: dict[str, Any] = Field(default_factory=dict)  # {name, test: {metric: value}}
    beats_trivial_baseline: bool | None = None

    def _number(self, key: str) -> float | None:
        value = (self.model_extra or {}).get(key)
        return None if value is None else float(value)

    def score(self, kind: ScoreKind = "final", metric: str | None = None) -> float | None:
        """A test score of `metric` (the primary one by default): at the final round, the mean of
        the last five rounds' evaluations, or at the round of best validation score."""
        m = metric or self.primary_metric
        key = {
            "final": f"final_test_{m}",
            "last5": f"mean_last5_test_{m}",
            "at_best_val": f"test_{m}_at_best_val",
        }
        return self._number(key[kind])

    def extras(self) -> dict[str, tuple[int, float]]:
        """The method's own work per kind of `RoundExtra`: (rounds with it, server seconds on it);
        summaries from before typed extras said `fisher_refreshes`."""
        keys = self.model_extra or {}
        out = {}
        for key, rounds in keys.items():
            kind = key.removesuffix("_rounds") if key.endswith("_rounds") else None
            if key == "fisher_refreshes":
                kind = "fisher"
            if kind is not None and f"{kind}_seconds" in keys and rounds:
                out[kind] = (int(rounds), float(keys[f"{kind}_seconds"]))
        return out

    def final_metrics(self) -> list[str]:
        """Every metric with a final test score, the primary one first."""
        names = [k.removeprefix("final_test_") for k in self.model_extra or {} if k.startswith("final_test_")]
        return sorted(names, key=lambda n: n != self.primary_metric)

    @property
    def baseline_name(self) -> str:
        """The trivial baseline's name (summaries written before tasks: majority_class)."""
        return str(self.trivial_baseline.get("name", "majority_class"))

    def baseline_score(self, metric: str | None = None) -> float | None:
        """The trivial baseline's test score of `metric` (the primary one by default)."""
        return self._number(f"{self.baseline_name}_test_{metric or self.primary_metric}")

    def layer_budget(self, group: str) -> int:
        """A group's layer budget (summaries written before the rename call it num_layers)."""
        entry = self.groups[group]
        return int(entry.get("budget", entry.get("num_layers", 0)))

    def to_json(self) -> dict[str, Any]:
        """The summary as written: the keys it was made with (absent ones stay absent)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "summary") -> Summary:
        """A summary of any version; one line naming the file and field when it is not one."""
        try:
            return cls.model_validate(dict(obj))
        except ValidationError as e:
            first = e.errors()[0]
            raise UserError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    @classmethod
    def read(cls, path: Path) -> Summary:
        try:
            return cls.from_json(json.loads(Path(path).read_text()), str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable summary ({e.__class__.__name__})") from None


def summarize(
    records: Sequence[RoundRecord],
    *,
    method: str,
    group_names: Sequence[str],
    wall_seconds: float,
    primary_metric: str,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """The run's headline numbers. Model selection uses validation, never test."""
    m = primary_metric
    scored = [(r, float(value)) for r in records if (value := r.metric("test", m)) is not None]
    evaluated = [r for r, _ in scored]
    tests = [value for _, value in scored]
    last_round = records[-1].round if records else 0
    # the evaluations of the last five rounds (all five when evaluating every round)
    late = [value for r, value in scored if r.round > last_round - LATE_ROUNDS] or tests[-1:]
    sign = 1.0 if higher_is_better else -1.0
    best = max(evaluated, key=lambda r: (sign * float(r.metric("val", m) or 0.0), -r.round), default=None)
    peak: dict[str, int] = {g: 0 for g in group_names}
    seconds: dict[str, list[float]] = {g: [] for g in group_names}
    for r in records:
        for c in r.clients:
            peak[c.group] = max(peak[c.group], int(c.peak_memory_bytes))
            if c.steps:
                seconds[c.group].append(c.seconds / c.steps)
    train = sum(r.train_seconds for r in records)
    evals = sum(r.eval_seconds or 0.0 for r in records)
    extra = sum(r.extra_seconds for r in records)
    kinds = sorted({kind for r in records for kind in r.extras})
    rounds = sum(r.round_seconds or 0.0 for r in records)
    out: dict[str, Any] = {
        "method": method,
        "primary_metric": m,
        "higher_is_better": higher_is_better,
        "rounds_completed": len(records),
        f"final_test_{m}": tests[-1] if tests else None,
        f"mean_last5_test_{m}": float(np.mean(late)) if late else None,
        f"best_val_{m}": best.metric("val", m) if best else None,
        "best_val_round": best.round if best else None,
        f"test_{m}_at_best_val": best.metric("test", m) if best else None,
        f"final_val_{m}": evaluated[-1].metric("val", m) if evaluated else None,
    }
    if evaluated:
        for name, value in evaluated[-1].metrics.get("test", {}).items():
            out.setdefault(f"final_test_{name}", value)
    out |= {
        "bytes_uploaded_total": int(sum(r.bytes_up for r in records)),
        "bytes_downloaded_total": int(sum(r.bytes_down for r in records)),
        "peak_memory_bytes_by_group": peak,
        "step_seconds_median_by_group": {g: float(np.median(v)) if v else None for g, v in seconds.items()},
        "rejected_updates": int(sum(len(r.rejected) for r in records)),
        "client_train_seconds": train,
        "eval_seconds": evals,
        "framework_overhead_fraction": (rounds - train - evals - extra) / rounds if rounds > 0 else None,
        "wall_seconds": wall_seconds,
    }
    for kind in kinds:  # a method's own work (e.g. Fisher refreshes): its rounds and server time
        out[f"{kind}_seconds"] = sum(
            float(r.extras[kind].get("seconds", 0.0)) for r in records if kind in r.extras
        )
        out[f"{kind}_rounds"] = sum(1 for r in records if kind in r.extras)
    return out


DRIFT_LIMIT = 0.5  # a group's measured round time this far off its prediction (relative) has drifted
DRIFT_ROUNDS = 2  # rounds in a row (of those the group trained in) before drift is reported


def time_ratios(records: Sequence[RoundRecord], group: str, speed: float) -> list[tuple[int, float]]:
    """(round, measured / predicted training seconds) for every round in which `group`'s clients
    trained with a prediction; measured as its devices would take it (seconds / speed), summed
    over the group's clients of the round."""
    out = []
    for r in records:
        clients = [c for c in r.clients if c.group == group and c.accepted and c.predicted_seconds]
        if clients:
            predicted = sum(float(c.predicted_seconds or 0.0) for c in clients)
            out.append((r.round, sum(c.seconds for c in clients) / speed / predicted))
    return out


def _off(ratio: float) -> bool:
    return abs(ratio - 1) > DRIFT_LIMIT


def off_streaks(ratios: Sequence[tuple[int, float]]) -> list[int]:
    """After each entry of `ratios`, how many entries in a row (ending there) were off by more
    than DRIFT_LIMIT."""
    out, streak = [], 0
    for _, ratio in ratios:
        streak = streak + 1 if _off(ratio) else 0
        out.append(streak)
    return out


def new_drift_warning(records: Sequence[RoundRecord], group: str, speed: float) -> str | None:
    """One warning when the last round makes DRIFT_ROUNDS in a row in which `group`'s measured
    time was more than DRIFT_LIMIT off its prediction (a longer streak is not warned again)."""
    ratios = time_ratios(records, group, speed)
    if not ratios or ratios[-1][0] != records[-1].round or off_streaks(ratios)[-1] != DRIFT_ROUNDS:
        return None
    shown = ", ".join(f"round {n}: {x:.2f}x" for n, x in ratios[-DRIFT_ROUNDS:])
    return (
        f"group {group}: measured training time is more than {DRIFT_LIMIT:.0%} off the cost model's "
        f"prediction for {DRIFT_ROUNDS} rounds in a row ({shown}); the machine is busier or quieter "
        "than when it calibrated (fedhello plan --recalibrate measures again)"
    )


def summarize_budgets(
    records: Sequence[RoundRecord], budgets: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per group with device budgets: the budgets, what the cost model allowed, the worst
    predicted and measured peak memory and round time, the clients over budget, and whether
    the group sat out (sampled but never given a layer set that fits)."""
    out: dict[str, dict[str, Any]] = {}
    for group, budget in budgets.items():
        clients = [c for r in records for c in r.clients if c.group == group]
        sampled_idle = sum(1 for r in records for c in r.idle if budget["members"] and c in budget["members"])
        measured_memory = [(c.model_memory_bytes or 0) + c.peak_memory_bytes for c in clients]
        speed = float(budget["speed"])
        out[group] = {
            **{k: v for k, v in budget.items() if k != "members"},
            "clients_trained": len(clients),
            "clients_sat_out": sampled_idle,
            "sat_out": not clients and sampled_idle > 0,
            "predicted_peak_memory_bytes": max(
                (c.predicted_memory_bytes or 0 for c in clients), default=None
            ),
            "measured_peak_memory_bytes": max(measured_memory, default=None),
            "measured_training_memory_bytes": max((c.peak_memory_bytes for c in clients), default=None),
            "predicted_seconds_per_round": max((c.predicted_seconds or 0.0 for c in clients), default=None),
            "measured_seconds_per_round": max((c.seconds / speed for c in clients), default=None),
            "clients_over_budget": sum(1 for c in clients if c.over_budget),
            **_drift(records, group, speed),
            "over_budget": sorted(
                {
                    f"round {r.round} client {c.client}: {', '.join(c.over_budget)}"
                    for r in records
                    for c in r.clients
                    if c.group == group and c.over_budget
                }
            ),
        }
        if out[group]["sat_out"]:
            out[group]["sat_out_reason"] = (
                f"no layer set this method sends fits its budgets ({budget['allowed']})"
            )
    return out


def _drift(records: Sequence[RoundRecord], group: str, speed: float) -> dict[str, Any]:
    """How the group's measured round time compared with its prediction, round by round."""
    ratios = time_ratios(records, group, speed)
    values = [x for _, x in ratios]
    return {
        "measured_to_predicted_seconds": {
            "median": float(np.median(values)) if values else None,
            "min": min(values, default=None),
            "max": max(values, default=None),
        },
        "rounds_time_off": [n for n, x in ratios if _off(x)],
        "time_drift": max(off_streaks(ratios), default=0) >= DRIFT_ROUNDS,
    }


def beats_baseline(value: float | None, baseline: float | None, higher_is_better: bool = True) -> bool | None:
    """Whether a score beats the trivial baseline's (None when either is missing)."""
    if value is None or baseline is None:
        return None
    return value > baseline if higher_is_better else value < baseline
