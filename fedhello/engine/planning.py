"""`fedhello plan`: what each group's device budgets allow, and what each method would send it.

For every group: its budgets, the layer sets they allow (per layer count, the lowest block a
set may start at) and the least a client needs. For every method: the layer sets it assigns
the group's clients in round 1 with the budgets respected, the worst predicted peak memory,
round time and upload among them, how many clients sit out, and a warning where what the
method would send without budgets does not fit. `--measure` trains every distinct layer set of
the plan for a few steps on the worst-case batch and prints prediction next to measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedhello.config import ExperimentConfig
from fedhello.engine.calibration import PROBE_STEPS, measure, worst_case_batch
from fedhello.engine.experiment import Experiment, method_context
from fedhello.method.base import Assignment, ClientProfile, RoundInputs
from fedhello.method.budgets import Cost, format_bytes
from fedhello.method.registry import build_method, method_entries
from fedhello.models.precision import full_precision_model, reduced_precision
from fedhello.seeding import Stream, numpy_rng


def _round_one(exp: Experiment, name: str, profiles: Mapping[int, ClientProfile]) -> dict[int, Assignment]:
    """The assignments a freshly built method makes in round 1 (flat Fisher scores if it needs any)."""
    method = build_method(name, method_context(exp.cfg, exp.num_layers, exp.groups, name))
    inputs = RoundInputs(
        1, profiles, numpy_rng(exp.cfg.seed, Stream.ALLOCATION, 1), lambda _options: np.ones(exp.num_layers)
    )
    return method.plan_round(inputs).assignments


@dataclass
class GroupPlan:
    """One method's round-1 assignments for one group, with their predicted worst case."""

    method: str
    group: str
    sets: list[tuple[int, ...]]
    ranks: list[int]
    sat_out: int
    worst: Cost | None
    warning: str | None

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {
            "method": self.method,
            "group": self.group,
            "layer_sets": [list(s) for s in self.sets],
            "ranks": self.ranks,
            "clients_sat_out": self.sat_out,
            "predicted_peak_memory_bytes": None if w is None else w.memory_bytes,
            "predicted_training_memory_bytes": None if w is None else w.training_bytes,
            "predicted_seconds_per_round": None if w is None else w.seconds,
            "predicted_upload_bytes": None if w is None else w.upload_bytes,
            "warning": self.warning,
        }


def _worst(exp: Experiment, assignments: Sequence[Assignment]) -> Cost | None:
    costs = [exp.predicted_cost(a.client, a.layers, a.rank) for a in assignments]
    real = [c for c in costs if c is not None]
    return max(real, key=lambda c: (c.memory_bytes, c.seconds, c.upload_bytes), default=None)


def plan_budgets(exp: Experiment, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """The plan as JSON-able data (`exp.costs` must be calibrated)."""
    costs = exp.costs
    assert costs is not None, "calibrate first (fedhello.engine.calibration.calibrated)"
    names = list(methods) if methods else list(method_entries())
    budgeted = {c: exp.profile(c) for c in range(exp.cfg.partition.num_clients)}
    unbudgeted = {c: ClientProfile(p.budget, p.rank) for c, p in budgeted.items()}
    rows: list[GroupPlan] = []
    for name in names:
        fitted = _round_one(exp, name, budgeted)
        free = _round_one(exp, name, unbudgeted)
        rows += [_group_plan(exp, name, i, fitted, free) for i in range(len(exp.groups))]
    return {
        "cost_model": {
            "device": costs.device,
            "batch": costs.batch_shape,
            "frozen_model_bytes": costs.model_bytes,
            "memory_coef": costs.memory_coef,
            "time_coef": costs.time_coef,
            "probes": [list(p.layers) for p in costs.probes],
            "fit_quality": None
            if costs.quality is None
            else {**asdict(costs.quality), "noisy": costs.quality.noisy},
            "fit": "not recorded (calibrated by an older fedhello)"
            if costs.quality is None
            else costs.quality.describe(),
        },
        "groups": [_group_allowance(exp, i) for i in range(len(exp.groups))],
        "methods": [r.to_json() for r in rows],
        "privacy": None if exp.privacy is None else exp.privacy.describe(exp.cfg.federation.rounds),
    }


def _group_allowance(exp: Experiment, i: int) -> dict[str, Any]:
    """What group i's device budgets allow: per layer count the lowest block a set may start
    at, the largest rank of an all-layer set, and the least a client needs."""
    assert exp.costs is not None
    g, steps = exp.groups[i], exp.group_steps(i)
    limits = exp.costs.limits(g.device_budget, steps)
    need = exp.costs.smallest_need(steps, g.device_budget.speed)
    return {
        "group": g.name,
        "layer_budget": g.budget,
        "rank": g.rank,
        "memory": g.device_budget.memory,
        "seconds_per_round": g.device_budget.seconds_per_round,
        "upload": g.device_budget.upload,
        "speed": g.device_budget.speed,
        "steps_per_round": steps,
        "lowest_block_by_count": list(limits.lowest),
        "max_rank_all_layers": limits.max_rank,
        "allowed": limits.describe() if g.device_budget.constrained else "no device budget",
        "least_peak_memory_bytes": need.memory_bytes,
    }


def _group_plan(
    exp: Experiment, name: str, i: int, fitted: Mapping[int, Assignment], free: Mapping[int, Assignment]
) -> GroupPlan:
    """Method `name`'s round-1 sets for group i with budgets (`fitted`), and a warning where its
    sets without budgets (`free`) would not fit."""
    g = exp.groups[i]
    members = [c for c in range(exp.cfg.partition.num_clients) if int(exp.client_group[c]) == i]
    given = [fitted[c] for c in members]
    trained = [a for a in given if a.layers]
    warning = None
    misfits = []
    for c in members if g.device_budget.constrained else ():
        cost = exp.predicted_cost(c, free[c].layers, free[c].rank)
        if cost is not None and cost.over(g.device_budget):
            misfits.append((free[c].layers, cost.over(g.device_budget)))
    if misfits:
        layers, over = misfits[0]
        n_idle = len(given) - len(trained)
        then = f"{n_idle} of {len(given)} clients sit out" if n_idle else "it sends smaller sets"
        warning = (
            f"without budgets {name} would send layers {list(layers)}, over the {'/'.join(over)} "
            f"budget; {then}"
        )
    return GroupPlan(
        name,
        g.name,
        sorted({a.layers for a in trained}),
        sorted({int(a.rank) for a in trained if a.rank is not None}),
        len(given) - len(trained),
        _worst(exp, trained),
        warning,
    )


def measure_plan(exp: Experiment, plan: dict[str, Any], steps: int = PROBE_STEPS) -> list[dict[str, Any]]:
    """Train every distinct layer set of the plan on the worst-case batch (median of `steps`
    steps) and compare with the prediction; probe sets (used to calibrate) are marked."""
    costs = exp.costs
    assert costs is not None
    probes = {tuple(p.layers) for p in costs.probes}
    sets = sorted({tuple(s) for row in plan["methods"] for s in row["layer_sets"]}, key=lambda s: (len(s), s))
    batch = worst_case_batch(exp)
    out = []
    for layers in sets:
        measured = measure(exp, layers, steps, batch)
        predicted_training = costs.training_bytes(layers)
        predicted_step = costs.seconds_per_step(layers)
        total_measured = costs.model_bytes + measured.training_bytes
        out.append(
            {
                "layers": list(layers),
                "probe": layers in probes,
                "predicted_peak_memory_bytes": costs.model_bytes + predicted_training,
                "measured_peak_memory_bytes": total_measured,
                "peak_memory_error": (costs.model_bytes + predicted_training) / total_measured - 1,
                "predicted_training_memory_bytes": predicted_training,
                "measured_training_memory_bytes": measured.training_bytes,
                "training_memory_error": predicted_training / max(1, measured.training_bytes) - 1,
                "predicted_step_seconds": predicted_step,
                "measured_step_seconds": measured.seconds_per_step,
                "step_time_error": predicted_step / measured.seconds_per_step - 1,
            }
        )
    return out


def memory_options(cfg: ExperimentConfig) -> str | None:
    """The memory-saving settings of a config ("nf4 / bfloat16 + activation checkpointing"), or
    None when it trains the float32, unquantised base without checkpointing."""
    parts = [p for p in [reduced_precision(cfg.model, cfg.device)] if p is not None]
    parts += ["activation checkpointing"] if cfg.train.activation_checkpointing else []
    return " + ".join(parts) or None


def without_memory_options(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same run on the float32, unquantised base without checkpointing."""
    train = cfg.train.model_copy(update={"activation_checkpointing": False})
    return cfg.model_copy(update={"model": full_precision_model(cfg.model), "train": train})


def compare_allowance(exp: Experiment, plain: Experiment, options: str) -> dict[str, Any]:
    """Per group, what its budgets allow with the config's memory options (`exp`) and without
    them (`plain`, calibrated too): `fedhello plan` prints both."""
    assert exp.costs is not None and plain.costs is not None
    rows = []
    for i, group in enumerate(exp.groups):
        steps = exp.group_steps(i)
        with_limits = exp.costs.limits(group.device_budget, steps)
        plain_limits = plain.costs.limits(group.device_budget, steps)
        rows.append(
            {
                "group": group.name,
                "max_layers_with": max(with_limits.counts(), default=0),
                "max_layers_without": max(plain_limits.counts(), default=0),
                "allowed_with": with_limits.describe(),
                "allowed_without": plain_limits.describe(),
            }
        )
    return {
        "options": options,
        "frozen_model_bytes_with": exp.costs.model_bytes,
        "frozen_model_bytes_without": plain.costs.model_bytes,
        "all_layers_training_bytes_with": exp.costs.training_bytes(tuple(range(exp.num_layers))),
        "all_layers_training_bytes_without": plain.costs.training_bytes(tuple(range(plain.num_layers))),
        "groups": rows,
    }


def _mib(n: float | None) -> str:
    return "-" if n is None else format_bytes(n)


def _privacy_line(privacy: dict[str, Any] | None) -> list[str]:
    """What the configured run will spend (docs/privacy.md)."""
    if privacy is None:
        return []
    return [
        f"privacy: {privacy['mode']} DP, clip {privacy['clip_norm']:g}, noise multiplier "
        f"{privacy['noise_multiplier']:.4g}, sampling rate {privacy['sample_rate']:g}: the configured rounds "
        f"spend epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} ({privacy['accountant']} accountant)"
    ]


def format_plan(plan: dict[str, Any], measured: list[dict[str, Any]] | None = None) -> str:
    """The plan as text tables."""
    cm = plan["cost_model"]
    lines = [
        f"cost model: {cm['device']}, worst-case batch {cm['batch']}, frozen model {_mib(cm['frozen_model_bytes'])}, "
        f"calibrated on layer sets {cm['probes']}",
        f"fit: {cm['fit']}",
        *_privacy_line(plan.get("privacy")),
        "",
        "group   layers rank  memory      s/round  upload      speed steps  allowed",
    ]
    for g in plan["groups"]:
        secs = "-" if g["seconds_per_round"] is None else f"{g['seconds_per_round']:g}"
        lines.append(
            f"{g['group']:<7} {g['layer_budget']:>6} {g['rank']:>4}  {_mib(g['memory']):<11} {secs:>7}  "
            f"{_mib(g['upload']):<11} {g['speed']:>5g} {g['steps_per_round']:>5}  {g['allowed']}"
        )
    compared = plan.get("memory_options")
    if compared is not None:
        lines += [
            "",
            f"with {compared['options']}: frozen model {_mib(compared['frozen_model_bytes_with'])}, all layers "
            f"train in {_mib(compared['all_layers_training_bytes_with'])}; without (float32, no checkpointing): "
            f"{_mib(compared['frozen_model_bytes_without'])} and {_mib(compared['all_layers_training_bytes_without'])}",
        ]
        for g in compared["groups"]:
            lines.append(f"{g['group']:<7} with:    {g['allowed_with']}")
            lines.append(f"{'':<7} without: {g['allowed_without']}")
    lines += ["", "method           group   sets  ranks  sat out  peak memory  train memory  s/round  upload"]
    warnings = []
    for r in plan["methods"]:
        secs = r["predicted_seconds_per_round"]
        lines.append(
            f"{r['method']:<16} {r['group']:<7} {len(r['layer_sets']):>4}  {','.join(map(str, r['ranks'])) or '-':>5}  "
            f"{r['clients_sat_out']:>7}  {_mib(r['predicted_peak_memory_bytes']):>11}  "
            f"{_mib(r['predicted_training_memory_bytes']):>12}  {'-' if secs is None else f'{secs:.2f}':>7}  "
            f"{_mib(r['predicted_upload_bytes'])}"
        )
        if r["warning"] and r["clients_sat_out"]:
            warnings.append(f"warning: {r['method']} / {r['group']}: {r['warning']}")
    adjusted = sum(1 for r in plan["methods"] if r["warning"] and not r["clients_sat_out"])
    if adjusted:
        warnings.append(
            f"note: {adjusted} method/group pairs send smaller or higher layer sets than without budgets (--json says which)"
        )
    lines += ["", *warnings] if warnings else []
    if measured is not None:
        lines += [
            "",
            "measured (worst-case batch, median step):",
            "layers                 probe  peak pred   peak meas   err     train pred  train meas  err     "
            "step pred  step meas  err",
        ]
        for m in measured:
            lines.append(
                f"{','.join(map(str, m['layers'])):<22} {'yes' if m['probe'] else '':<5}  "
                f"{_mib(m['predicted_peak_memory_bytes']):<10}  {_mib(m['measured_peak_memory_bytes']):<10}  "
                f"{m['peak_memory_error']:+.1%}  {_mib(m['predicted_training_memory_bytes']):<10}  "
                f"{_mib(m['measured_training_memory_bytes']):<10}  {m['training_memory_error']:+.1%}  "
                f"{m['predicted_step_seconds']:.3f} s    {m['measured_step_seconds']:.3f} s    {m['step_time_error']:+.1%}"
            )
        held_out = [m for m in measured if not m["probe"]]
        if held_out:
            mem = max(abs(m["peak_memory_error"]) for m in held_out)
            step = float(np.median([abs(m["step_time_error"]) for m in held_out]))
            worst_step = max(abs(m["step_time_error"]) for m in held_out)
            lines.append(
                f"{len(held_out)} layer sets not among the probes: largest peak memory error {mem:.1%}, "
                f"step time error median {step:.1%}, largest {worst_step:.1%}"
            )
    return "\n".join(lines)
