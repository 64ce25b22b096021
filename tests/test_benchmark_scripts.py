"""The benchmark scripts that cannot run in full here stay runnable: the GPU script in its tiny
CPU mode, and the cost-model benchmark's choice of held-out layer sets."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_model_benchmark_measures_at_least_eight_sets_that_were_not_probes() -> None:
    from fedhello.method.budgets import probe_sets

    held_out = _module("cost_model").held_out_sets
    for L in (6, 12):
        sets = held_out(L)
        assert len(sets) >= 8 and not set(sets) & set(probe_sets(L))
        assert len({len(s) for s in sets}) >= 4 and len({min(s) for s in sets}) >= 4


def test_gpu_script_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--tiny", "--dtype", "float32"]
    proc = subprocess.run(
        [*cmd, "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(out.read_text())
    results = written["models"]
    assert [r["model"] for r in results] == ["ViT-B/16 shape", "SmolLM2-135M shape"]
    quantised = {
        (r["base"], r["checkpointing"], r["allocation"]): r for r in written["quantised_llm"]["rows"]
    }
    bf16, nf4 = quantised[("bf16", False, "all layers")], quantised[("nf4 / bf16", False, "all layers")]
    assert nf4["frozen_model_bytes"] < bf16["frozen_model_bytes"]
    assert quantised[("nf4 / bf16", True, "all layers")]["training_bytes"] < nf4["training_bytes"]
    for r in results:
        assert {row["allocation"] for row in r["rows"]} >= {"top block", "all layers"}
        assert all(abs(row["peak_error"]) < 0.05 for row in r["rows"])  # CPU account: exact up to the fit
        assert r["fisher"]["largest_relative_difference"] < 1e-4 and r["fisher"]["speedup"] > 0
