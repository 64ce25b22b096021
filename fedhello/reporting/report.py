"""The comparison report: tables and plots from the finished cells of one or more grids.

The task's primary metric (accuracy for classification) is reported three ways, none of them
best-on-test: the final round's, the mean of the last five rounds' evaluations, and the test
value at the round with the best validation value; each as mean and standard deviation over
seeds. Next to them: the other final metrics (macro-F1), and the task's trivial baseline
(always the largest class) per setting, with every cell that does not beat it flagged.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedhello.grid import git_commit, load_cells
from fedhello.method.registry import DEFAULT_METHOD
from fedhello.reporting.summary import SCORE_LABELS, ScoreKind, Summary, beats_baseline
from fedhello.tasks.metrics import LOWER_IS_BETTER

MiB = 2**20
FLAG = "†"  # marks a score that does not beat the trivial baseline


@dataclass
class GridResults:
    """One grid's finished cells, grouped by (setting, roc, method); each cell's "summary" is a
    `Summary`."""

    path: Path
    cells: list[dict[str, Any]]
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> GridResults:
        meta_path = path / "grid.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(path, load_cells(path), meta)

    def ordered(self, key: str) -> list[str]:
        """Values of a cell key in the grid's own order (the command's), else first seen."""
        wanted = self.meta.get(key + "s", [])
        seen = [c["cell"][key] for c in self.cells]
        return [v for v in wanted if v in seen] + [v for v in dict.fromkeys(seen) if v not in wanted]

    def group(self, setting: str, roc: str, method: str) -> list[dict[str, Any]]:
        return [
            c
            for c in self.cells
            if (c["cell"]["setting"], c["cell"]["roc"], c["cell"]["method"]) == (setting, roc, method)
        ]

    def pooled(self, method: str, roc: str) -> list[dict[str, Any]]:
        """A method's cells at one client ratio, over every setting and seed."""
        return [c for c in self.cells if c["cell"]["method"] == method and c["cell"]["roc"] == roc]

    @property
    def model(self) -> str:
        """The model's name, marked "not pretrained" when the cells trained random weights."""
        if not self.cells:
            return "?"
        name = str(self.cells[0].get("model", "?"))
        if any(c["summary"].pretrained is False for c in self.cells):
            name += " (not pretrained)"
        return name

    @property
    def metric(self) -> str:
        """The task's primary metric (cells written before typed records: accuracy)."""
        return self.summary.primary_metric if self.cells else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        """For the primary metric (the task says)."""
        return self.summary.higher_is_better if self.cells else True

    def higher_is_better_for(self, metric: str) -> bool:
        """For any metric: the task's word for its primary one, the name for the rest (a
        report's extra columns include perplexity)."""
        return self.higher_is_better if metric == self.metric else metric not in LOWER_IS_BETTER

    @property
    def summary(self) -> Summary:
        """The first cell's summary (what every cell of the grid shares: task, groups, layers)."""
        summary = self.cells[0]["summary"]
        assert isinstance(summary, Summary)
        return summary

    @property
    def extra_metrics(self) -> list[str]:
        """Other final test metrics the cells report (e.g. macro_f1), in first-seen order."""
        names = dict.fromkeys(n for c in self.cells for n in c["summary"].final_metrics())
        return [n for n in names if n not in (self.metric, "loss")]

    def baseline(self, setting: str, metric: str | None = None) -> float:
        """The trivial baseline's test score in a setting (mean over its cells; NaN if unknown)."""
        metric = metric or self.metric
        values = []
        for c in self.cells:
            if c["cell"]["setting"] != setting:
                continue
            value = c["summary"].baseline_score(metric)
            if value is not None:
                values.append(value)
        return float(np.mean(values)) if values else float("nan")

    def baseline_name(self) -> str:
        return self.summary.baseline_name.replace("_", " ")

    def beats(self, value: float, setting: str, metric: str | None = None) -> bool:
        """Whether a score beats the setting's trivial baseline (True when either is unknown)."""
        base = self.baseline(setting, metric)
        if np.isnan(base) or np.isnan(value):
            return True
        return bool(beats_baseline(value, base, self.higher_is_better_for(metric or self.metric)))


SummaryValue = Callable[[Summary], float | None]


def _values(cells: Sequence[dict[str, Any]], get: SummaryValue) -> list[float]:
    """`get` of every cell's summary, where it has a value."""
    values = [get(c["summary"]) for c in cells]
    return [float(v) for v in values if v is not None]


def _scores(cells: Sequence[dict[str, Any]], kind: ScoreKind, metric: str) -> list[float]:
    return _values(cells, lambda s: s.score(kind, metric))


def _uploaded(s: Summary) -> float:
    return s.bytes_uploaded_total


def _downloaded(s: Summary) -> float:
    return s.bytes_downloaded_total


def _client_seconds(s: Summary) -> float:
    return s.client_train_seconds


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(values: Sequence[float]) -> str:
    """Mean ± std over seeds; a single seed shows its value alone (it has no spread to show)."""
    m, s = _mean_std(values)
    if np.isnan(m):
        return "n/a"
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} ± {s:.3f}"


def _peak_mib(cells: Sequence[dict[str, Any]], group: str) -> float:
    vals = [c["summary"].peak_memory_bytes_by_group.get(group, 0) for c in cells]
    vals = [v for v in vals if v]
    return float(np.median(vals)) / MiB if vals else float("nan")


def _step_s(cells: Sequence[dict[str, Any]], group: str) -> float:
    vals = [c["summary"].step_seconds_median_by_group.get(group) for c in cells]
    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else float("nan")


def _mean_client_peak(cells: Sequence[dict[str, Any]]) -> float:
    """Mean over client-rounds of a client's peak training memory (what a typical client needs)."""
    vals = [cl.peak_memory_bytes for c in cells for r in c["rounds"] for cl in r.clients if cl.steps]
    return float(np.mean(vals)) if vals else float("nan")


# -- tables --------------------------------------------------------------------------------
def accuracy_table(grid: GridResults, roc: str) -> str:
    """Methods x (setting, way of reporting) of the primary metric, the other final metrics, and a
    last row with the trivial baseline; a score that does not beat it carries the FLAG."""
    settings, methods = grid.ordered("setting"), grid.ordered("method")
    methods = [m for m in methods if any(grid.group(s, roc, m) for s in settings)]  # none: no row
    extra = grid.extra_metrics
    columns: list[tuple[str, ScoreKind, str]] = [(a, kind, grid.metric) for kind, a in SCORE_LABELS.items()]
    columns += [(f"final {e}", "final", e) for e in extra]
    head = "| method | " + " | ".join(f"{s}: {a}" for s in settings for a, _, _ in columns) + " |"
    lines = [head, "|---" * (1 + len(settings) * len(columns)) + "|"]
    best: dict[tuple[str, str], float] = {}
    for s in settings:
        for a, kind, metric in columns:
            means = [_mean_std(_scores(grid.group(s, roc, m), kind, metric))[0] for m in methods]
            pick = np.nanmax if grid.higher_is_better_for(metric) else np.nanmin
            best[(s, a)] = pick(means) if not all(np.isnan(means)) else float("nan")
    for m in methods:
        row = []
        for s in settings:
            for a, kind, metric in columns:
                vals = _scores(grid.group(s, roc, m), kind, metric)
                text = _fmt(vals)
                if vals and abs(_mean_std(vals)[0] - best[(s, a)]) < 1e-12:
                    text = f"**{text}**"
                if vals and not grid.beats(_mean_std(vals)[0], s, metric):
                    text += f" {FLAG}"
                row.append(text)
        n = len(grid.group(settings[0], roc, m))
        lines.append(f"| {m} ({n} seed{'s' if n != 1 else ''}) | " + " | ".join(row) + " |")
    base_row = []
    for s in settings:
        for _, _, metric in columns:
            value = grid.baseline(s, metric)
            base_row.append("n/a" if np.isnan(value) else f"{value:.3f}")
    lines.append(f"| *{grid.baseline_name()}* | " + " | ".join(base_row) + " |")
    return "\n".join(lines)


def not_beating_baseline(grid: GridResults) -> list[str]:
    """Every (setting, ratio, method, seed) cell whose final primary metric does not beat the
    trivial baseline of its own test split."""
    out = []
    m = grid.metric
    for c in grid.cells:
        s = c["summary"]
        value, base = s.score("final"), s.baseline_score()
        if beats_baseline(value, base, grid.higher_is_better) is False:
            cell = c["cell"]
            out.append(
                f"- {cell['setting']}, {cell['roc']}, {cell['method']}, seed {cell['seed']}: "
                f"final {m} {value:.3f} against {base:.3f} for the {grid.baseline_name()}"
            )
    return out


def cost_table(grid: GridResults, roc: str) -> str:
    """Per method, pooled over settings and seeds: memory and step time per group, bytes, and
    clients' compute seconds (medians: timings on a shared machine have outliers)."""
    methods = grid.ordered("method")
    summary = grid.summary
    groups = list(summary.groups)
    head = (
        "| method | "
        + " | ".join(f"{g} ({summary.layer_budget(g)} layers): peak MiB, step s" for g in groups)
        + " | upload MB/round | download MB/round | upload MB total | download MB total | client compute s per run (median) |"
    )
    lines = [head, "|---" * (6 + len(groups)) + "|"]
    for m in methods:
        cells = grid.pooled(m, roc)
        if not cells:
            continue
        per_group = " | ".join(
            "never trains"
            if np.isnan(_peak_mib(cells, g))
            else f"{_peak_mib(cells, g):.0f}, {_step_s(cells, g):.3f}"
            for g in groups
        )
        rounds = [r for c in cells for r in c["rounds"]]
        up = np.mean([r.bytes_up for r in rounds]) / 1e6
        down = np.mean([r.bytes_down for r in rounds]) / 1e6
        up_total = np.mean(_values(cells, _uploaded)) / 1e6
        down_total = np.mean(_values(cells, _downloaded)) / 1e6
        compute = np.median(_values(cells, _client_seconds))
        lines.append(
            f"| {m} | {per_group} | {up:.2f} | {down:.2f} | {up_total:.1f} | {down_total:.1f} | {compute:.0f} |"
        )
    return "\n".join(lines)


def extras_table(grid: GridResults) -> str | None:
    """What the methods recorded of their own (a `RoundExtra` per round: Fisher refreshes,
    importance scores, pruning), per method and kind: rounds with it and the server's seconds
    on it, per run (means over cells, from their summaries). None when no method recorded any."""
    rows = []
    for m in grid.ordered("method"):
        per_cell = [c["summary"].extras() for c in grid.cells if c["cell"]["method"] == m]
        for kind in sorted({k for e in per_cell for k in e}):
            rounds = np.mean([e.get(kind, (0, 0.0))[0] for e in per_cell])
            seconds = np.mean([e.get(kind, (0, 0.0))[1] for e in per_cell])
            rows.append(f"| {m} | {kind} | {rounds:.1f} | {seconds:.1f} |")
    if not rows:
        return None
    return "\n".join(
        ["| method | recorded | rounds per run | server seconds per run |", "|---|---|---|---|", *rows]
    )


def budget_table(grid: GridResults) -> str | None:
    """For methods run with device budgets (docs/budgets.md): per group, the memory budget, the
    worst predicted and measured peak memory over every client-round (frozen model included),
    the clients over budget and the client-rounds that sat out, pooled over settings, ratios and
    seeds. None when no cell of the grid has budgets."""
    lines = [
        "| method | group | memory budget MiB | predicted peak MiB (worst) | measured peak MiB (worst) "
        "| measured training MiB (worst) | client-rounds over budget | client-rounds sat out | allowed |",
        "|---" * 9 + "|",
    ]
    for m in grid.ordered("method"):
        cells = [c for c in grid.cells if c["cell"]["method"] == m and c["summary"].budgets is not None]
        if not cells:
            continue
        for g in cells[0]["summary"].budgets:
            rows = [c["summary"].budgets[g] for c in cells]
            budget = rows[0]["memory"]

            def worst(key: str, rows: list[dict[str, Any]] = rows) -> str:
                vals = [r[key] for r in rows if r.get(key) is not None]
                return f"{max(vals) / MiB:.1f}" if vals else "-"

            over = sum(r["clients_over_budget"] for r in rows)
            idle = sum(r["clients_sat_out"] for r in rows)
            lines.append(
                f"| {m} | {g} | {'-' if budget is None else f'{budget / MiB:.0f}'} | {worst('predicted_peak_memory_bytes')} "
                f"| {worst('measured_peak_memory_bytes')} | {worst('measured_training_memory_bytes')} "
                f"| {over}{' **over budget**' if over else ''} | {idle} | {rows[0]['allowed']} |"
            )
    return "\n".join(lines) if len(lines) > 2 else None


def fraction_table(grid: GridResults, method: str, reference: str) -> str:
    """What fraction of the reference method's score `method` reaches, at what fraction of its costs."""
    lines = [
        f"| setting | client ratio | {method} final acc | {reference} final acc | accuracy fraction (final) "
        "| accuracy fraction (last-5) | upload bytes fraction | mean client peak memory fraction "
        "| low group peak memory fraction |",
        "|---" * 9 + "|",
    ]
    low = next(iter(grid.summary.groups)) if grid.cells else ""
    for s in grid.ordered("setting"):
        for roc in grid.ordered("roc"):
            a, b = grid.group(s, roc, method), grid.group(s, roc, reference)
            if not a or not b:
                continue
            m = grid.metric
            fa, fb = _mean_std(_scores(a, "final", m))[0], _mean_std(_scores(b, "final", m))[0]
            la, lb = _mean_std(_scores(a, "last5", m))[0], _mean_std(_scores(b, "last5", m))[0]
            up = np.mean(_values(a, _uploaded)) / np.mean(_values(b, _uploaded))
            ta, tb = _trained_per_round(a), _trained_per_round(b)
            trained = f" ({ta:.1f} vs {tb:.1f} clients trained per round)" if abs(ta - tb) > 0.05 else ""
            mem = _mean_client_peak(a) / _mean_client_peak(b)
            lines.append(
                f"| {s} | {roc} | {fa:.3f} | {fb:.3f} | {_ratio(fa, fb)} | {_ratio(la, lb)} | {up:.2f}{trained} "
                f"| {mem:.2f} | {_low_fraction(a, b, low, method, reference)} |"
            )
    return "\n".join(lines)


def _paired(
    grid: GridResults, method: str, other: str, setting: str | None = None
) -> list[tuple[float, float]]:
    """(method's, other's) final primary metric in every cell they share: same setting, ratio
    and seed, hence the same split, partition and client sampling."""

    def key(c: dict[str, Any]) -> tuple[str, str, int]:
        return (c["cell"]["setting"], c["cell"]["roc"], c["cell"]["seed"])

    theirs = {key(c): c["summary"].score("final") for c in grid.cells if c["cell"]["method"] == other}
    out = []
    for c in grid.cells:
        if c["cell"]["method"] != method or (setting is not None and c["cell"]["setting"] != setting):
            continue
        mine, match = c["summary"].score("final"), theirs.get(key(c))
        if mine is not None and match is not None:
            out.append((float(mine), float(match)))
    return out


def paired_table(grid: GridResults, method: str) -> str | None:
    """`method` against every other method over the cells they share (same setting, ratio and
    seed): the median difference, wins / ties / losses, and the two-sided Wilcoxon signed-rank
    p-value (scipy; ties dropped), pooled over the grid and per setting; next to each method its
    median final score and range over its cells."""
    from scipy.stats import wilcoxon

    settings = grid.ordered("setting")
    others = [m for m in grid.ordered("method") if m != method]
    if method not in grid.ordered("method") or not others:
        return None
    sign = 1.0 if grid.higher_is_better else -1.0
    head = (
        f"| method | median final (min-max) | pairs | median {method} - method | {method} wins / ties / losses "
        "| Wilcoxon p | " + " | ".join(f"{s}: median diff, W/L" for s in settings) + " |"
    )
    lines = [head, "|---" * (6 + len(settings)) + "|"]
    for other in others:
        pairs = _paired(grid, method, other)
        if not pairs:
            continue
        diffs = np.array([a - b for a, b in pairs])
        wins = int(np.sum(sign * diffs > 1e-12))
        losses = int(np.sum(sign * diffs < -1e-12))
        ties = len(diffs) - wins - losses
        nonzero = diffs[np.abs(diffs) > 1e-12]
        p = f"{float(wilcoxon(nonzero).pvalue):.3f}" if len(nonzero) >= 5 else "n/a (< 5 untied pairs)"
        scores = _scores([c for c in grid.cells if c["cell"]["method"] == other], "final", grid.metric)
        per_setting = []
        for s in settings:
            d = np.array([a - b for a, b in _paired(grid, method, other, s)])
            per_setting.append(
                "-"
                if not len(d)
                else f"{np.median(d):+.3f}, {int(np.sum(sign * d > 1e-12))}/{int(np.sum(sign * d < -1e-12))}"
            )
        lines.append(
            f"| {other} | {np.median(scores):.3f} ({min(scores):.3f}-{max(scores):.3f}) | {len(pairs)} "
            f"| {np.median(diffs):+.3f} | {wins} / {ties} / {losses} | {p} | "
            + " | ".join(per_setting)
            + " |"
        )
    mine = _scores([c for c in grid.cells if c["cell"]["method"] == method], "final", grid.metric)
    lines.append(
        f"| *{method}* | {np.median(mine):.3f} ({min(mine):.3f}-{max(mine):.3f}) | "
        + " | ".join(["-"] * (4 + len(settings)))
        + " |"
    )
    return "\n".join(lines)


def identical_methods(grid: GridResults) -> list[str]:
    """Pairs of methods whose cells trained the same clients on the same layers at the same ranks
    in every round of every shared cell, and scored alike: at equal budgets two methods can
    differ only in what the clients that no longer fit would have trained (e.g. FedIT and
    HetLoRA when only the high group fits every layer at any rank)."""

    def trace(c: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            tuple((cl.client, tuple(cl.layers), cl.rank) for cl in r.clients if cl.steps) for r in c["rounds"]
        )

    def same_clients(x: tuple[Any, ...], y: tuple[Any, ...]) -> bool:
        """The same clients on the same layers every round; ranks compared where both methods
        record one (a layer-set method records none: it trains at the configured rank)."""
        if len(x) != len(y) or any(len(rx) != len(ry) for rx, ry in zip(x, y, strict=True)):
            return False
        return all(
            cx == cy and lx == ly and (kx is None or ky is None or kx == ky)
            for rx, ry in zip(x, y, strict=True)
            for (cx, lx, kx), (cy, ly, ky) in zip(rx, ry, strict=True)
        )

    by_method: dict[str, dict[tuple[str, str, int], dict[str, Any]]] = defaultdict(dict)
    for c in grid.cells:
        cell = c["cell"]
        by_method[cell["method"]][(cell["setting"], cell["roc"], cell["seed"])] = c
    out = []
    methods = grid.ordered("method")
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            all_shared = sorted(set(by_method[a]) & set(by_method[b]))
            rocs = sorted({k[1] for k in all_shared})
            alike = [
                roc
                for roc in rocs
                if all(
                    by_method[a][k]["summary"].score("final") == by_method[b][k]["summary"].score("final")
                    for k in all_shared
                    if k[1] == roc
                )
            ]
            if not alike:
                continue
            shared = [k for k in all_shared if k[1] in alike]
            same_trace = all(same_clients(trace(by_method[a][k]), trace(by_method[b][k])) for k in shared)
            groups = sorted(
                {cl.group for k in shared for r in by_method[a][k]["rounds"] for cl in r.clients if cl.steps}
            )
            where = (
                "" if alike == rocs else f" at client ratio{'s' if len(alike) > 1 else ''} {', '.join(alike)}"
            )
            why = (
                f"in all {len(shared)} shared cells{where} the same clients trained the same layers at the same "
                f"ranks in every round (only group{'s' if len(groups) > 1 else ''} {', '.join(groups)} "
                "trained; the others sat out), so the runs were one computation"
                if same_trace
                else f"equal final scores in all {len(shared)} shared cells{where}, with different client traces"
            )
            out.append(f"- {a} and {b}: {why}.")
    return out


def _trained_per_round(cells: Sequence[dict[str, Any]]) -> float:
    """Mean number of clients that trained in a round (at equal budgets some sit out)."""
    counts = [sum(1 for cl in r.clients if cl.steps) for c in cells for r in c["rounds"]]
    return float(np.mean(counts)) if counts else float("nan")


def _low_fraction(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], low: str, method: str, reference: str
) -> str:
    """The low group's peak memory of `method` over `reference`'s, or which of them had the
    low group sit out (no peak to compare)."""
    mine, theirs = _peak_mib(a, low), _peak_mib(b, low)
    if np.isnan(theirs) or np.isnan(mine):
        who = " and ".join(n for n, v in ((method, mine), (reference, theirs)) if np.isnan(v))
        return f"{low} sat out in {who}"
    return f"{mine / theirs:.2f}"


def _ratio(a: float, b: float) -> str:
    """a / b to two decimals; n/a where b is zero or either is unknown (a reference that scored 0)."""
    return "n/a" if b == 0 or np.isnan(a) or np.isnan(b) else f"{a / b:.2f}"


def losses_against(grid: GridResults, method: str) -> list[str]:
    """Every (setting, ratio, baseline) where `method` does not have the higher mean final accuracy."""
    out = []
    for s in grid.ordered("setting"):
        for roc in grid.ordered("roc"):
            mine = _scores(grid.group(s, roc, method), "final", grid.metric)
            if not mine:
                continue
            m_mean, m_std = _mean_std(mine)
            for other in grid.ordered("method"):
                theirs = _scores(grid.group(s, roc, other), "final", grid.metric)
                if other == method or not theirs:
                    continue
                o_mean, o_std = _mean_std(theirs)
                if (o_mean >= m_mean) if grid.higher_is_better else (o_mean <= m_mean):
                    if len(mine) > 1 and len(theirs) > 1:
                        spread = "within" if o_mean - m_mean <= max(m_std, o_std) else "beyond"
                        note = f"{spread} one seed std"
                    else:
                        note = "one seed: no spread to compare with"
                    out.append(
                        f"- {s}, {roc}: {other} {_fmt(theirs)} vs {method} {_fmt(mine)} "
                        f"(+{o_mean - m_mean:.3f}, {note})"
                    )
    return out


def write_csv(grids: Sequence[GridResults], path: Path) -> None:
    """One row per (grid, setting, ratio, method): accuracies over seeds and costs."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        head = ["model", "grid", "setting", "roc", "method", "seeds"]
        head += ["metric"]
        for a in SCORE_LABELS.values():
            head += [f"{a} mean", f"{a} std"]
        head += ["trivial baseline"]
        head += ["upload MB total", "download MB total", "client train s total", "mean client peak MiB"]
        w.writerow(head)
        for g in grids:
            for s in g.ordered("setting"):
                for roc in g.ordered("roc"):
                    for m in g.ordered("method"):
                        cells = g.group(s, roc, m)
                        if not cells:
                            continue
                        row: list[Any] = [g.model, g.path.name, s, roc, m, len(cells)]
                        row += [g.metric]
                        for kind in SCORE_LABELS:
                            row += [f"{x:.4f}" for x in _mean_std(_scores(cells, kind, g.metric))]
                        row += [f"{g.baseline(s):.4f}"]
                        row += [
                            f"{np.mean(_values(cells, _uploaded)) / 1e6:.3f}",
                            f"{np.mean(_values(cells, _downloaded)) / 1e6:.3f}",
                            f"{np.mean(_values(cells, _client_seconds)):.2f}",
                            f"{_mean_client_peak(cells) / MiB:.1f}",
                        ]
                        w.writerow(row)


# -- plots ---------------------------------------------------------------------------------
def _curve(cells: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for c in cells:
        for r in c["rounds"]:
            value = r.metric("test", metric)
            if value is not None:
                by_round[r.round].append(value)
    rounds = sorted(by_round)
    return rounds, [float(np.mean(by_round[r])) for r in rounds]


def _save(fig: Any, path: Path, *, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_curves(grid: GridResults, roc: str, path: Path) -> None:
    settings, methods = grid.ordered("setting"), grid.ordered("method")
    colors = _colors(methods)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for m in methods:
            rounds, acc = _curve(grid.group(s, roc, m), grid.metric)
            if rounds:
                ax.plot(rounds, acc, "o-", ms=3, lw=1.4, color=colors[m], label=m)
        ax.set_title(f"{s}, clients {roc}")
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {grid.metric.replace('_', ' ')} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)


def plot_accuracy_vs_cost(
    grid: GridResults, cost: SummaryValue, label: str, scale: float, path: Path
) -> None:
    settings, methods = grid.ordered("setting"), grid.ordered("method")
    colors = _colors(methods)
    markers = dict(zip(grid.ordered("roc"), "os^Dv", strict=False))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for m in methods:
            for roc, marker in markers.items():
                cells = grid.group(s, roc, m)
                if not cells:
                    continue
                x = np.mean(_values(cells, cost)) / scale
                y = np.mean(_scores(cells, "final", grid.metric))
                ax.scatter(x, y, color=colors[m], marker=marker, s=36, label=f"{m} ({roc})")
        ax.set_title(s)
        ax.set_xlabel(label)
        ax.set_ylabel(f"final test {grid.metric.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=2)
    _save(fig, path)


def plot_group_costs(grid: GridResults, roc: str, path: Path) -> None:
    methods = grid.ordered("method")
    groups = list(grid.summary.groups)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(groups)
    x = np.arange(len(methods))
    for i, g in enumerate(groups):
        cells_of = [grid.pooled(m, roc) for m in methods]
        ax_m.bar(x + i * width, [_peak_mib(cs, g) for cs in cells_of], width, label=g)
        ax_t.bar(x + i * width, [_step_s(cs, g) for cs in cells_of], width, label=g)
    for ax, title in ((ax_m, "peak training memory (MiB)"), (ax_t, "median step time (s)")):
        ax.set_xticks(x + width * (len(groups) - 1) / 2, methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax_m.legend(title="group", fontsize=8)
    _save(fig, path)


def plot_allocation(grid: GridResults, roc: str, path: Path) -> None:
    """Realised fraction of client-rounds that trained each layer, per group and method."""
    methods = grid.ordered("method")
    groups = list(grid.summary.groups)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(3.6 * len(groups), 0.35 * len(methods) + 1.6), squeeze=False
    )
    for ax, g in zip(axes[0], groups, strict=True):
        rows = []
        for m in methods:
            cells = grid.pooled(m, roc)
            if not cells:
                rows.append(np.full(grid.summary.num_layers, np.nan))
                continue
            rows.append(np.mean([c["layer_frequency"][g] for c in cells], axis=0))
        im = ax.imshow(np.array(rows), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(methods)), methods if ax is axes[0][0] else [], fontsize=8)
        ax.set_xlabel("layer (0 = input side)")
        ax.set_title(f"group {g}")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.colorbar(im, cax=fig.add_axes((0.92, 0.2, 0.015, 0.6)), label="fraction of client-rounds")
    _save(fig, path, tight=False)


# -- the report ----------------------------------------------------------------------------
def _describe(grid: GridResults) -> str:
    c = grid.summary
    groups = ", ".join(f"{g} {c.layer_budget(g)} of {c.num_layers} blocks" for g in c.groups)
    base = grid.meta.get("base_config", {})
    fed, train, data = base.get("federation", {}), base.get("train", {}), base.get("data", {})
    aggregation = c.aggregation
    robust = [f"{k.replace('_', ' ')} {v}" for k, v in aggregation.items() if k != "rejected_updates"]
    parts = [
        f"model {grid.model} ({c.num_layers} blocks)",
        *(
            ["aggregation: " + ", ".join(robust)]
            if aggregation and robust != ["rule mean", "norm bound none"]
            else []
        ),
        f"budgets: {groups}",
        f"settings: {', '.join(grid.ordered('setting'))}",
        f"client ratios (low:mid:high): {', '.join(grid.ordered('roc'))}",
        f"{len(grid.cells)} finished cells",
    ]
    if fed:
        text = base.get("task", "text-classification") == "text-classification"
        length = f"sequence length {base.get('model', {}).get('max_length')}, " if text else ""
        parts.append(
            f"{fed.get('rounds')} rounds, {fed.get('clients_per_round')} of "
            f"{base.get('partition', {}).get('num_clients')} clients per round, {train.get('local_steps')} local "
            f"steps of batch {train.get('batch_size')}, lr {train.get('lr')}, {length}"
            f"{data.get('val_size')} validation and {data.get('test_size')} test examples"
        )
    return "; ".join(parts) + "."


def _figure(
    plot: Callable[[GridResults, str, Path], object], grid: GridResults, roc: str, stem: Path, alt: str
) -> str:
    """Plot one client ratio's figure next to the report (`stem`-<roc>.png) and link it."""
    path = stem.with_name(f"{stem.name}-{roc.replace(':', '-')}.png")
    plot(grid, roc, path)
    return f"![{alt}]({path.parent.name}/{path.name})"


def _grid_section(grid: GridResults, tag: str, figures: Path, method: str, reference: str) -> list[str]:
    """One grid's part of the report: its tables, with the plots written into `figures`."""
    lines: list[str] = []
    lines += [f"## {grid.model}: {grid.path.name}", "", _describe(grid), ""]
    if grid.meta.get("command"):
        lines += [f"Grid command: `{grid.meta['command']}`", ""]
    for roc in grid.ordered("roc"):
        lines += [f"### {grid.metric.replace('_', ' ').capitalize()}, clients {roc} (low:mid:high)", ""]
        lines += [accuracy_table(grid, roc), ""]
        lines += [
            _figure(plot_curves, grid, roc, figures / f"{tag}-curves", f"accuracy per round, {roc}"),
            "",
        ]
    below = not_beating_baseline(grid)
    lines += [f"### Cells that do not beat the {grid.baseline_name()}", ""]
    lines += (below or ["- none: every cell's final score beats it"]) + [""]
    lines += _method_section(grid, method, reference)
    lines += _cost_section(grid, tag, figures)
    return lines


def _method_section(grid: GridResults, method: str, reference: str) -> list[str]:
    """How `method` compares: its fractions of `reference`, and where it is not the best."""
    lines: list[str] = []
    methods = grid.ordered("method")
    if method in methods and reference in methods:
        lines += [
            f"### {method} against {reference}",
            "",
            f"Fractions are {method}'s value over {reference}'s in the same setting and ratio (means over seeds).",
            "",
            fraction_table(grid, method, reference),
            "",
        ]
    paired = paired_table(grid, method)
    if paired is not None:
        lines += [
            f"### {method} paired with every other method",
            "",
            f"Each pair is one cell of both methods with the same setting, client ratio and seed (the same "
            f"split, partition and client sampling); differences are {method}'s final "
            f"{grid.metric.replace('_', ' ')} minus the other's.",
            "",
            paired,
            "",
        ]
    same = identical_methods(grid)
    if same:
        lines += ["### Methods that computed the same runs", "", *same, ""]
    if method in methods:
        losses = losses_against(grid, method)
        lines += [
            f"### Where {method} does not have the best mean final {grid.metric.replace('_', ' ')}",
            "",
        ]
        lines += (losses or ["- nowhere in this grid"]) + [""]
    return lines


def _cost_section(grid: GridResults, tag: str, figures: Path) -> list[str]:
    """Device budgets, costs per group, realised allocation, the methods' own work, and accuracy
    against costs."""
    lines: list[str] = []
    extras = extras_table(grid)
    if extras is not None:
        lines += ["### What the methods recorded of their own", "", extras, ""]
    budgets = budget_table(grid)
    if budgets is not None:
        lines += [
            "### Device budgets (predicted and measured)",
            "",
            "Methods run with device budgets per group; clients that exceeded their budget are "
            "counted and marked **over budget**.",
            "",
            budgets,
            "",
        ]
    for roc in grid.ordered("roc"):
        lines += [f"### Costs per client group, clients {roc} (pooled over settings and seeds)", ""]
        lines += [cost_table(grid, roc), ""]
        lines += [
            _figure(
                plot_group_costs,
                grid,
                roc,
                figures / f"{tag}-group-costs",
                "peak memory and step time per group",
            ),
            "",
        ]
        lines += [
            f"Realised per-layer training frequencies (fraction of a group's client-rounds that trained "
            f"each layer, pooled over settings and seeds), clients {roc}:",
            "",
            _figure(plot_allocation, grid, roc, figures / f"{tag}-allocation", "allocation frequencies"),
            "",
        ]
    name = f"{tag}-accuracy-vs-upload.png"
    plot_accuracy_vs_cost(grid, _uploaded, "total upload (MB)", 1e6, figures / name)
    lines += [
        "### Accuracy against communication and compute",
        "",
        f"![accuracy vs upload]({figures.name}/{name})",
    ]
    name = f"{tag}-accuracy-vs-compute.png"
    plot_accuracy_vs_cost(grid, _client_seconds, "total client training time (s)", 1.0, figures / name)
    lines += ["", f"![accuracy vs client compute]({figures.name}/{name})", ""]
    return lines


def write_report(
    grids: Sequence[Path],
    out: Path,
    *,
    command: str | None = None,
    notes: Path | None = None,
    method: str = DEFAULT_METHOD,
    reference: str = "fedit",
) -> None:
    """Write the Markdown report and its PNG plots (into a folder named after the report);
    `method` is compared with every other method, and with `reference` in costs too."""
    figures = out.parent / (out.stem + "-plots")
    figures.mkdir(parents=True, exist_ok=True)
    loaded = [g for g in (GridResults.load(p) for p in grids) if g.cells]
    commits = sorted({c["commit"] for g in loaded for c in g.cells})
    lines = [
        "# Results: Fed-HeLLo against its baselines",
        "",
        f"Made by `{command or 'fedhello report ' + ' '.join(map(str, grids))}` "
        f"(report written at commit {git_commit()} on {time.strftime('%Y-%m-%d')}; "
        f"cells computed at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}).",
        "",
        f"The same numbers as CSV: [{out.with_suffix('.csv').name}]({out.with_suffix('.csv').name}).",
        "",
        "Scores are the task's primary metric (accuracy for classification) of the global model on "
        "the test split: at the final round, averaged over the evaluations of the last five rounds, "
        "and at the round of best validation score (never best-on-test); mean ± standard deviation "
        "over seeds. The best mean of each column is in bold. The last row of each table is the "
        f"task's trivial baseline on the same test split (for classification: always predicting the "
        f"largest class); a score marked {FLAG} does not beat it.",
        "",
    ]
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    for gi, grid in enumerate(loaded):
        lines += _grid_section(grid, f"g{gi}", figures, method, reference)
    out.write_text("\n".join(lines) + "\n")
    write_csv(loaded, out.with_suffix(".csv"))
