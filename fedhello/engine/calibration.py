"""Calibrating the cost model (`fedhello/method/budgets.py`) with probe steps on this machine.

A probe trains one layer set for a few steps on the costliest batch a client can meet (the
task's `worst_case_batch`: padded to `model.max_length`, or the largest images), through the
same `train_client` every engine uses, and records what training added to memory (the
`MemoryMeter`: the CUDA allocator's peak, or the exact CPU account) and its step times.

Four probe sets fit the model, each measured in PROBE_PASSES passes interleaved with the others
(a burst of load then slows every set a little, not one set a lot). A busy machine makes step
times noisy: when a probe's steps spread too much or the fit leaves a large residual, the probes
are measured again (up to MAX_ATTEMPTS), and the best fit is kept and marked noisy. The fit is
non-negative (`CostModel.fit`), so even a noisy model never predicts that fewer layers cost more.

The result is cached per model, batch shape, LoRA config, device and thread count under the
cache folder, and copied into the run directory, so a resumed run plans with the model it
started with. A cached model is checked with one cheap probe when it is loaded, and measured
anew when that probe is off by more than RECHECK_TOLERANCE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedhello.config import TrainConfig
from fedhello.engine.client import train_client
from fedhello.engine.experiment import Experiment
from fedhello.io import cache_root, write_json_atomic
from fedhello.method.aggregation import payload_bytes
from fedhello.method.base import Assignment
from fedhello.method.budgets import (
    CostModel,
    FitQuality,
    Probe,
    check_budget_fits,
    probe_sets,
)
from fedhello.models import AdaptedModel
from fedhello.models.precision import frozen_model_bytes
from fedhello.tasks import Task

log = logging.getLogger(__name__)

PROBE_STEPS = 4  # measured steps per probe pass (after one warm-up step)
PROBE_PASSES = 2  # passes over the probe sets per attempt; a probe's figure is its median step
MAX_ATTEMPTS = 3  # measuring attempts while the fit stays noisy (the best one is kept)
RECHECK_TOLERANCE = 0.30  # a cached model off by more than this on its check probe is recalibrated
COST_MODEL_FILE = "cost_model.json"
CACHE_VERSION = 2  # 2: non-negative fits with their quality (version 1 fits could be negative)


def model_bytes(model: torch.nn.Module) -> int:
    """Every parameter and buffer the client holds, at its stored (possibly quantised) size: the
    frozen part of its memory."""
    return frozen_model_bytes(model)


def measure_layers(
    lm: AdaptedModel,
    task: Task,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    train: TrainConfig,
    *,
    train_head: bool,
    device: torch.device,
    steps: int = PROBE_STEPS,
) -> Probe:
    """Train `layers` for one warm-up step and `steps` measured steps on `batch` (the model's
    adapters are restored afterwards); returns the peak training memory and the median step
    seconds. Any model with LoRA and any task: the GPU benchmark measures through this too."""
    saved = lm.lora_state()
    try:
        result = train_client(
            lm,
            task,
            None,
            np.zeros(1, dtype=np.int64),
            saved,
            Assignment(0, tuple(sorted(layers))),
            train.model_copy(update={"local_steps": steps + 1}),
            train_head=train_head,
            seed=0,
            round_number=0,
            device=device,
            batch_source=[batch] * (steps + 1),
        )
    finally:
        lm.load_lora_state(saved)
    steps_measured = tuple(float(x) for x in result.step_seconds[1:])
    return Probe(
        tuple(sorted(layers)), result.peak_memory_bytes, float(np.median(steps_measured)), steps_measured
    )


def merge_passes(passes: Sequence[Probe]) -> Probe:
    """One probe from several passes over the same layer set: every step time, their median, and
    the largest memory seen."""
    steps = tuple(x for p in passes for x in p.step_seconds)
    return Probe(passes[0].layers, max(p.training_bytes for p in passes), float(np.median(steps)), steps)


def calibrate_model(
    lm: AdaptedModel,
    task: Task,
    batch: dict[str, torch.Tensor],
    train: TrainConfig,
    *,
    train_head: bool,
    device: torch.device,
    rank: int,
    steps: int = PROBE_STEPS,
) -> CostModel:
    """Fit the cost model of this model, batch and device to probe steps (docs/budgets.md)."""

    def nbytes(names: Sequence[str]) -> int:
        return payload_bytes({k: lm.parameter(k) for k in names})

    costs = CostModel(
        num_layers=lm.num_layers,
        model_bytes=model_bytes(lm.model),
        layer_bytes=[nbytes(lm.trained_names([i], False)) for i in range(lm.num_layers)],
        head_bytes=nbytes(lm.head_params) if train_head else 0,
        rank=rank,
        memory_coef=[0.0, 0.0, 0.0],
        time_coef=[0.0, 0.0, 0.0],
        device=device_name(device),
        batch_shape=" x ".join(str(d) for d in next(iter(batch.values())).shape),
    )
    best: tuple[CostModel, FitQuality] | None = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        passes: dict[tuple[int, ...], list[Probe]] = {s: [] for s in probe_sets(costs.num_layers)}
        for _ in range(PROBE_PASSES):
            for layers, measured in passes.items():
                measured.append(
                    measure_layers(
                        lm, task, batch, layers, train, train_head=train_head, device=device, steps=steps
                    )
                )
        fit = costs.fitted([merge_passes(p) for p in passes.values()], attempt)
        if best is None or fit[1].badness < best[1].badness:
            best = fit
        if not fit[1].noisy:
            break
        log.info("cost model: noisy probes, %s; measuring again", fit[1].describe())
    assert best is not None
    model, quality = best
    return replace(model, quality=replace(quality, attempts=attempt))


def worst_case_batch(exp: Experiment) -> dict[str, torch.Tensor]:
    return exp.task.worst_case_batch(exp.data, exp.splits["train"], exp.cfg.train.batch_size)


def measure(
    exp: Experiment,
    layers: Sequence[int],
    steps: int = PROBE_STEPS,
    batch: dict[str, torch.Tensor] | None = None,
) -> Probe:
    """`measure_layers` for a run's model, task and worst-case batch."""
    return measure_layers(
        exp.adapted,
        exp.task,
        worst_case_batch(exp) if batch is None else batch,
        layers,
        exp.cfg.train,
        train_head=exp.train_head,
        device=exp.device,
        steps=steps,
    )


def calibrate(exp: Experiment, steps: int = PROBE_STEPS) -> CostModel:
    """`calibrate_model` for a run's model, task and worst-case batch."""
    return calibrate_model(
        exp.adapted,
        exp.task,
        worst_case_batch(exp),
        exp.cfg.train,
        train_head=exp.train_head,
        device=exp.device,
        rank=exp.cfg.lora.r,
        steps=steps,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{_cpu_model()}:{torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(exp: Experiment) -> str:
    """What the calibration depends on: model, batch shape, LoRA config, task, training mode, device."""
    cfg = exp.cfg
    parts = {
        "task": cfg.task,
        "model": cfg.model.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "data_source": cfg.data.source,
        "batch_size": cfg.train.batch_size,
        **({"checkpointing": True} if cfg.train.activation_checkpointing else {}),
        "head": exp.train_head,
        "device": device_name(exp.device),
        "torch": torch.__version__,
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def calibrated(exp: Experiment, run_dir: Path | None = None, *, refresh: bool = False) -> CostModel:
    """The cost model of this experiment: the run's own (a resume), else the cached one for this
    model and machine, else a fresh calibration (then cached, and stored in the run)."""
    own = run_dir / COST_MODEL_FILE if run_dir is not None else None
    if own is not None and own.is_file() and not refresh:
        return CostModel.from_json(json.loads(own.read_text()))
    cached = cache_root() / "costs" / f"{cache_key(exp)}.json"
    costs = None
    if cached.is_file() and not refresh:
        costs = CostModel.from_json(json.loads(cached.read_text()))
        off = recheck(exp, costs)
        if off is None:
            log.info("cost model: cached calibration %s", cached)
        else:
            log.warning(
                "cost model: the cached calibration is %s on this machine now; calibrating again", off
            )
            costs = None
    if costs is None:
        log.info("cost model: calibrating with %d probe layer sets", len(probe_sets(exp.num_layers)))
        costs = calibrate(exp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, costs.to_json())
    if own is not None:
        write_json_atomic(own, costs.to_json())
    return costs


def recheck(exp: Experiment, costs: CostModel) -> str | None:
    """One cheap probe (the top block alone) against a cached model's prediction: how far off it
    is when step time or training memory differ by more than RECHECK_TOLERANCE, else None."""
    top = (exp.num_layers - 1,)
    probe = measure(exp, top)
    predicted = {
        "step time": costs.seconds_per_step(top),
        "training memory": float(costs.training_bytes(top)),
    }
    measured = {"step time": probe.seconds_per_step, "training memory": float(probe.training_bytes)}
    for what, value in predicted.items():
        if value > 0 and abs(measured[what] / value - 1) > RECHECK_TOLERANCE:
            return f"off by {measured[what] / value - 1:+.0%} in {what} on the top block"
    return None


def attach_costs(exp: Experiment, run_dir: Path | None = None) -> None:
    """Calibrate when any group states a device budget (a run without budgets is untouched),
    and refuse budgets nothing fits before any training."""
    if not any(g.device_budget.constrained for g in exp.groups):
        return
    exp.costs = calibrated(exp, run_dir)
    quality = exp.costs.quality
    if (
        quality is not None
        and quality.noisy
        and any(g.device_budget.seconds_per_round is not None for g in exp.groups)
    ):
        log.warning(
            "cost model: time budgets are planned with a noisy calibration, %s; "
            "`fedhello plan --recalibrate` on a quieter machine measures again",
            quality.describe(),
        )
    check_budgets(exp)


def check_budgets(exp: Experiment) -> None:
    """A one-line error naming the group for a budget that not even the top block alone fits."""
    assert exp.costs is not None
    for i, group in enumerate(exp.groups):
        if group.device_budget.constrained:
            steps = exp.group_steps(i)
            limits = exp.costs.limits(group.device_budget, steps)
            need = exp.costs.smallest_need(steps, group.device_budget.speed)
            check_budget_fits(limits, need, group.device_budget, f"groups.{i} ({group.name})")
