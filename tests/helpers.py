"""Small helpers shared by tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhello.method.allocation import AllocationStrategy
from fedhello.method.base import MethodContext
from fedhello.method.fisher import FisherOptions
from fedhello.method.layers import LayerAllocation
from fedhello.method.registry import build_method


def build_strategy(
    method: str,
    num_layers: int,
    budgets: Sequence[int],
    shares: Sequence[float],
    *,
    rounds: int = 1,
    seed: int = 0,
    fisher: FisherOptions | None = None,
) -> AllocationStrategy:
    """The allocation strategy behind a layer-allocation method, built through the registry."""
    ctx = MethodContext(num_layers, budgets, shares, rounds, seed, options=fisher or FisherOptions())
    built = build_method(method, ctx)
    assert isinstance(built, LayerAllocation), f"{method} is not a layer-allocation method"
    return built.strategy


TIMING_KEYS = {
    "seconds",
    "train_seconds",
    "eval_seconds",
    "round_seconds",
    "peak_memory_bytes",
    "step_seconds",
}


def allocate_layers(strategy: Any, round_number: int, budgets: dict[int, int], seed: int) -> Any:
    """One round's allocation by a strategy, from the round's allocation stream, as the server
    draws it (the stream depends only on (seed, round))."""
    from fedhello.seeding import Stream, numpy_rng

    return strategy.allocate(round_number, budgets, numpy_rng(seed, Stream.ALLOCATION, round_number))


def strip_timing(obj: Any) -> Any:
    """A records tree without its timings (which differ between two runs of one seed)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def train_first_client(exp: Any, layers: tuple[int, ...], setup_fn: Any = None, **train: Any) -> Any:
    """Client 0 of an experiment trains `layers` (and the head) from the initial adapters, with
    `train` overriding the config's train settings (e.g. local_steps=2); `setup_fn` replaces real
    freezing (the benchmark's pseudo-freezing)."""
    from fedhello.engine.client import setup_training, train_client
    from fedhello.method.base import Assignment

    return train_client(
        exp.adapted,
        exp.task,
        exp.data,
        exp.client_indices[0],
        exp.adapted.lora_state(),
        Assignment(0, layers),
        exp.cfg.train.model_copy(update=train),
        train_head=True,
        seed=0,
        round_number=1,
        device=exp.device,
        setup_fn=setup_fn or setup_training,
    )


def pseudo_freezing() -> Any:
    """benchmarks/freezing.py's pseudo-freezing (the released code's learning-rate-0 "freezing")."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "freezing.py"
    spec = importlib.util.spec_from_file_location("freezing_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pseudo_freezing


def run_simulated(overrides: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    """`fedhello run ... engine=flower --out OUT` in a process of its own (Flower's simulation)."""
    return subprocess.run(
        [sys.executable, "-m", "fedhello", "run", *overrides, "engine=flower", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
