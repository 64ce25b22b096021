"""End to end with the real offline MiniLM and real Wikipedia articles: it must actually learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhello.cli import main

pytestmark = pytest.mark.slow  # the real MiniLM for 3 rounds


def test_short_real_minilm_run_learns(tmp_path: Path, token_cache: Path, default_torch_threads: int) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "federation.rounds=3",
            "federation.clients_per_round=3",
            "partition.num_clients=6",
            "train.local_steps=8",
            "eval.every=3",  # the last round only: what the checks below read
            "data.val_size=100",
            "data.test_size=300",
            "model.max_length=48",
            f"data.cache_dir={token_cache}",
            "quiet=true",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_layers"] == 6
    assert summary["rounds_completed"] == 3
    # 11 topics, the largest ~20%: a model that learned nothing stays near that.
    assert summary["final_test_accuracy"] > summary["majority_class_test_accuracy"] + 0.15
    assert summary["final_test_macro_f1"] > summary["majority_class_test_macro_f1"] + 0.15
    assert summary["beats_trivial_baseline"] is True
    # budgets 1/2, 3/4, all of 6 blocks: the low group trains 3 layers and uploads less than the high one
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ups = {c["group"]: c["bytes_up"] for r in rounds for c in r["clients"]}
    sizes = {c["group"]: len(c["layers"]) for r in rounds for c in r["clients"]}
    assert {"low", "high"} <= set(sizes)  # seed 0 samples clients of both groups
    assert sizes["low"] == 3 and sizes["high"] == 6
    assert ups["low"] < ups["high"]
