"""One Markdown table from several runs' summaries: scores next to what they cost."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhello.reporting.summary import baseline_score


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def summaries_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Rows: runs; columns: the primary metric (final, last rounds, at best validation), the other
    final metrics, the trivial baseline, and costs per group."""
    if not summaries:
        return ""
    m = summaries[0].get("primary_metric", "accuracy")
    extra = [
        k.removeprefix("final_test_")
        for k in summaries[0]
        if k.startswith("final_test_") and k not in (f"final_test_{m}", "final_test_loss")
    ]
    groups = list(summaries[0]["peak_memory_bytes_by_group"])
    head = (
        f"| method | final test {m} | mean test {m}, last 5 rounds | test {m} at best val | "
        + "".join(f"final test {e} | " for e in extra)
        + f"trivial baseline {m} | upload (MB) | download (MB) | "
        + " | ".join(f"{g}: peak train mem (MiB), step (s)" for g in groups)
        + " | wall (s) |"
    )
    lines = [head, "|" + "---|" * (8 + len(extra) + len(groups))]
    for s in summaries:
        cost = " | ".join(
            f"{s['peak_memory_bytes_by_group'].get(g, 0) / 2**20:.0f}, "
            f"{_fmt(s['step_seconds_median_by_group'].get(g), '.3f')}"
            for g in groups
        )
        flag = " †" if s.get("beats_trivial_baseline") is False else ""
        lines.append(
            f"| {s['method']} | {_fmt(s.get(f'final_test_{m}'), '.3f')}{flag} "
            f"| {_fmt(s.get(f'mean_last5_test_{m}'), '.3f')} | {_fmt(s.get(f'test_{m}_at_best_val'), '.3f')} | "
            + "".join(f"{_fmt(s.get(f'final_test_{e}'), '.3f')} | " for e in extra)
            + f"{_fmt(baseline_score(s, m), '.3f')} | {s['bytes_uploaded_total'] / 1e6:.1f} "
            f"| {s['bytes_downloaded_total'] / 1e6:.1f} | {cost} | {s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
