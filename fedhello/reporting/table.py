"""One Markdown table from several runs' summaries: accuracy next to what it cost."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def summaries_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Rows: method; columns: accuracy (final, last rounds, at best validation) and costs."""
    groups = list(summaries[0]["peak_memory_bytes_by_group"]) if summaries else []
    head = (
        "| method | final test acc | mean test acc, last 5 rounds | test acc at best val | upload (MB) "
        "| download (MB) | "
        + " | ".join(f"{g}: peak train mem (MiB), step (s)" for g in groups)
        + " | wall (s) |"
    )
    lines = [head, "|" + "---|" * (7 + len(groups))]
    for s in summaries:
        cost = " | ".join(
            f"{s['peak_memory_bytes_by_group'].get(g, 0) / 2**20:.0f}, "
            f"{_fmt(s['step_seconds_median_by_group'].get(g), '.3f')}"
            for g in groups
        )
        lines.append(
            f"| {s['method']} | {_fmt(s['final_test_accuracy'], '.3f')} | {_fmt(s['mean_last5_test_accuracy'], '.3f')} "
            f"| {_fmt(s['test_accuracy_at_best_val'], '.3f')} | {s['bytes_uploaded_total'] / 1e6:.1f} "
            f"| {s['bytes_downloaded_total'] / 1e6:.1f} | {cost} | {s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
