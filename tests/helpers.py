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


def strip_timing(obj: Any) -> Any:
    """A records tree without its timings (which differ between two runs of one seed)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def train_first_client(exp: Any, layers: tuple[int, ...], **train: Any) -> Any:
    """Client 0 of an experiment trains `layers` (and the head) from the initial adapters, with
    `train` overriding the config's train settings (e.g. local_steps=2)."""
    from fedhello.engine.client import train_client
    from fedhello.method.base import Assignment

    return train_client(
        exp.lm,
        exp.task,
        exp.data,
        exp.client_indices[0],
        exp.lm.lora_state(),
        Assignment(0, layers),
        exp.cfg.train.model_copy(update=train),
        train_head=True,
        seed=0,
        round_number=1,
        device=exp.device,
    )


def run_simulated(overrides: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    """`fedhello run ... engine=flower --out OUT` in a process of its own (Flower's simulation)."""
    return subprocess.run(
        [sys.executable, "-m", "fedhello", "run", *overrides, "engine=flower", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
