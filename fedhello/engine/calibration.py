"""Calibrating the cost model (`fedhello/method/budgets.py`) with probe steps on this machine.

A probe trains one layer set for a few steps on the costliest batch a client can meet (the
task's `worst_case_batch`: padded to `model.max_length`, or the largest images), through the
same `train_client` every engine uses, and records what training added to memory (the
`MemoryMeter`: the CUDA allocator's peak, or the exact CPU account) and the median step time.
Four probes fit the model; the result is cached per model, batch shape, LoRA config, device and
thread count under the cache folder, and copied into the run directory, so a resumed run plans
with the model it started with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedhello.config import TrainConfig
from fedhello.engine.client import train_client
from fedhello.engine.experiment import Experiment
from fedhello.errors import UserError
from fedhello.io import write_json_atomic
from fedhello.method.aggregation import payload_bytes
from fedhello.method.base import Assignment
from fedhello.method.budgets import (
    OPTIMIZER_COPIES,
    CostModel,
    Probe,
    check_budget_fits,
    fit_coefficients,
    probe_sets,
)
from fedhello.models import LoraModel
from fedhello.models.loading import cache_root
from fedhello.tasks import Task

log = logging.getLogger(__name__)

PROBE_STEPS = 4  # measured steps per probe (after one warm-up step), median taken
COST_MODEL_FILE = "cost_model.json"


def model_bytes(model: torch.nn.Module) -> int:
    """Every parameter and buffer the client holds, at its dtype (the frozen part of its memory)."""
    return payload_bytes(dict(model.named_parameters())) + payload_bytes(dict(model.named_buffers()))


def measure_layers(
    lm: LoraModel,
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
    return Probe(tuple(sorted(layers)), result.peak_memory_bytes, float(np.median(result.step_seconds[1:])))


def calibrate_model(
    lm: LoraModel,
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
    probes = [
        measure_layers(lm, task, batch, s, train, train_head=train_head, device=device, steps=steps)
        for s in probe_sets(costs.num_layers)
    ]
    features = np.stack([costs.features(p.layers) for p in probes])
    memory = np.array([p.training_bytes - OPTIMIZER_COPIES * costs.trained_bytes(p.layers) for p in probes])
    costs.memory_coef = fit_coefficients(features, memory.astype(float))
    costs.time_coef = fit_coefficients(features, np.array([p.seconds_per_step for p in probes]))
    costs.probes = probes
    return costs


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
        exp.lm,
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
        exp.lm,
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
        "head": exp.train_head,
        "device": device_name(exp.device),
        "torch": torch.__version__,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def calibrated(exp: Experiment, run_dir: Path | None = None, *, refresh: bool = False) -> CostModel:
    """The cost model of this experiment: the run's own (a resume), else the cached one for this
    model and machine, else a fresh calibration (then cached, and stored in the run)."""
    if exp.cfg.train.freezing != "real":
        raise UserError(
            "groups: device budgets need train.freezing=real (pseudo-freezing trains every adapter)"
        )
    own = run_dir / COST_MODEL_FILE if run_dir is not None else None
    if own is not None and own.is_file() and not refresh:
        return CostModel.from_json(json.loads(own.read_text()))
    cached = cache_root() / "costs" / f"{cache_key(exp)}.json"
    if cached.is_file() and not refresh:
        costs = CostModel.from_json(json.loads(cached.read_text()))
        log.info("cost model: cached calibration %s", cached)
    else:
        log.info("cost model: calibrating with %d probe layer sets", len(probe_sets(exp.num_layers)))
        costs = calibrate(exp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, costs.to_json())
    if own is not None:
        write_json_atomic(own, costs.to_json())
    return costs


def attach_costs(exp: Experiment, run_dir: Path | None = None) -> None:
    """Calibrate when any group states a device budget (a run without budgets is untouched),
    and refuse budgets nothing fits before any training."""
    if not any(g.device.constrained for g in exp.groups):
        return
    exp.costs = calibrated(exp, run_dir)
    check_budgets(exp)


def check_budgets(exp: Experiment) -> None:
    """A one-line error naming the group for a budget that not even the top block alone fits."""
    assert exp.costs is not None
    for i, group in enumerate(exp.groups):
        if group.device.constrained:
            steps = exp.group_steps(i)
            limits = exp.costs.limits(group.device, steps)
            need = exp.costs.smallest_need(steps, group.device.speed)
            check_budget_fits(limits, need, group.device, f"groups.{i} ({group.name})")
