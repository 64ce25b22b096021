"""The GPU figures of docs/budgets.md, in one run (started by benchmarks/gpu.sh, under 8 minutes).

For a ViT-B/16-shaped classifier (224 x 224 images) and a SmolLM2-135M-shaped causal LM
(30 blocks, 512 tokens), randomly initialised from transformers configs in bf16 (no download):
1. calibrate the cost model (4 probe layer sets) and measure held-out layer sets: predicted vs
   measured peak memory (the CUDA allocator's peak) and step time;
2. step time and peak memory per allocation (top block, top half, bottleneck, all layers),
   with the model FLOP utilisation of the all-layer step (forward 2NT + input-gradient backward
   2NT over the frozen weights, against the chip's dense bf16 peak);
3. Fisher layer scores: vectorised per-sample gradients vs the per-sample loop (equal values);
4. a ~1.1B-parameter Llama-shaped decoder (TinyLlama's shape: 22 blocks, hidden 2048, random
   weights) in bf16, then with an nf4 base, then nf4 + activation checkpointing
   (docs/quantization.md): frozen-model bytes, peak memory and step time of the top-half and
   all-layer sets.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json]
    python benchmarks/gpu.py --device cpu --tiny      # a seconds-long smoke run (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhello.config import ExperimentConfig, LoraSettings, TrainConfig
from fedhello.engine.calibration import calibrate_model, measure_layers, model_bytes
from fedhello.method.allocation import geometric_layers
from fedhello.method.fisher import FisherOptions, fisher_layer_scores
from fedhello.models import AdaptedModel, add_lora
from fedhello.tasks import Task, build_task

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per chip


def vit_model(tiny: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import ViTConfig, ViTForImageClassification

    size = 32 if tiny else 224
    cfg = ViTConfig(
        image_size=size,
        patch_size=16,
        hidden_size=64 if tiny else 768,
        num_hidden_layers=4 if tiny else 12,
        num_attention_heads=4 if tiny else 12,
        intermediate_size=128 if tiny else 3072,
        num_labels=100,
    )
    return ViTForImageClassification(cfg), {"image_size": size, "batch": 4 if tiny else 64}


TINY_LLAMA = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def llama_model(
    tiny: bool, shape: dict[str, int], batch: int, **settings: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A Llama-shaped decoder with random weights: `shape` (or the tiny one), 512 tokens a row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY_LLAMA if tiny else shape), max_position_embeddings=2048, **settings)
    return LlamaForCausalLM(cfg), {
        "tokens": 32 if tiny else 512,
        "batch": 4 if tiny else batch,
        "vocab": cfg.vocab_size,
    }


def smollm_model(tiny: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """SmolLM2-135M's shape."""
    shape = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3}  # fmt: skip
    return llama_model(tiny, shape, 16, tie_word_embeddings=True)


def llama_1b_model(tiny: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """TinyLlama-1.1B's shape (no download)."""
    shape = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4}  # fmt: skip
    return llama_model(tiny, shape, 8)


def quantised_llm(device: torch.device, tiny: bool, steps: int) -> dict[str, Any]:
    """The ~1B decoder in bf16, nf4 and nf4 + checkpointing: bytes, peak memory, step time."""
    from fedhello.config import ModelConfig
    from fedhello.models.precision import enable_activation_checkpointing, prepare_base

    dtype = torch.bfloat16
    task = task_for("llm")
    rows = []
    for quantization, checkpointing in [("none", False), ("nf4", False), ("nf4", True)]:
        torch.manual_seed(0)
        with torch.device(device):
            model, shape = llama_1b_model(tiny)
        model = prepare_base(model.to(dtype), ModelConfig(quantization=quantization), keep_float32=[])
        lm = add_lora(model, LoraSettings(r=16, alpha=16), seed=0, head=False)
        lm.model.to(device)
        if checkpointing:
            enable_activation_checkpointing(lm.blocks)
        batch = batch_for("llm", shape, device, dtype)
        train = TrainConfig(batch_size=shape["batch"], lr=1e-3)
        L = lm.num_layers
        frozen = model_bytes(lm.model)
        for name, layers in [("top half", tuple(range(L // 2, L))), ("all layers", tuple(range(L)))]:
            m = measure_layers(lm, task, batch, layers, train, train_head=False, device=device, steps=steps)
            rows.append(
                {
                    "base": "bf16" if quantization == "none" else f"{quantization} / bf16",
                    "checkpointing": checkpointing,
                    "allocation": name,
                    "frozen_model_bytes": frozen,
                    "peak_bytes": frozen + m.training_bytes,
                    "training_bytes": m.training_bytes,
                    "step_seconds": m.seconds_per_step,
                }
            )
        del lm, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": "Llama 1.1B shape (TinyLlama)",
        "tiny": tiny,
        "batch": f"{shape['batch']} x {shape['tokens']}",
        "rows": rows,
    }


def batch_for(
    kind: str, shape: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = shape["batch"]
    if kind == "vit":
        s = shape["image_size"]
        return {
            "pixel_values": torch.randn(b, 3, s, s, generator=g).to(device, dtype),
            "labels": torch.randint(0, 100, (b,), generator=g).to(device),
        }
    t = shape["tokens"]
    ids = torch.randint(0, shape["vocab"], (b, t), generator=g).to(device)
    targets = torch.ones(b, t, dtype=torch.bool, device=device)
    targets[:, 0] = False
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": targets}


def task_for(kind: str) -> Task:
    cfg = ExperimentConfig(task="image-classification" if kind == "vit" else "causal-lm")
    return build_task(cfg)


def frozen_params(lm: AdaptedModel) -> int:
    lora = set(lm.lora_params) | set(lm.head_params)
    return sum(p.numel() for n, p in lm.model.named_parameters() if n not in lora)


def chip_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def run_model(kind: str, device: torch.device, tiny: bool, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    model, shape = vit_model(tiny) if kind == "vit" else smollm_model(tiny)
    torch.manual_seed(0)
    lm = add_lora(model.to(dtype), LoraSettings(r=16, alpha=16), seed=0, head=kind == "vit")
    lm.model.to(device)
    task = task_for(kind)
    batch = batch_for(kind, shape, device, dtype)
    train = TrainConfig(batch_size=shape["batch"], lr=1e-3)
    head = kind == "vit"
    start = time.perf_counter()
    costs = calibrate_model(lm, task, batch, train, train_head=head, device=device, rank=16, steps=steps)
    calibration_seconds = time.perf_counter() - start
    L = lm.num_layers
    allocations = {
        "top block": (L - 1,),
        "top half": tuple(range(L // 2, L)),
        f"bottleneck {L // 2}": geometric_layers("bottleneck", L // 2, L),
        "all layers": tuple(range(L)),
        "every other": tuple(range(1, L, 2)),
        "upper third": tuple(range(2 * L // 3, L)),
    }
    probes = {p.layers for p in costs.probes}
    rows = []
    for name, layers in allocations.items():
        m = measure_layers(lm, task, batch, layers, train, train_head=head, device=device, steps=steps)
        pred_mem, pred_step = costs.training_bytes(layers), costs.seconds_per_step(layers)
        rows.append(
            {
                "allocation": name,
                "layers": list(layers),
                "probe": tuple(layers) in probes,
                "measured_step_seconds": m.seconds_per_step,
                "predicted_step_seconds": pred_step,
                "measured_peak_bytes": costs.model_bytes + m.training_bytes,
                "predicted_peak_bytes": costs.model_bytes + pred_mem,
                "peak_error": (costs.model_bytes + pred_mem) / (costs.model_bytes + m.training_bytes) - 1,
                "step_error": pred_step / m.seconds_per_step - 1,
            }
        )
    every = next(r for r in rows if r["allocation"] == "all layers")
    tokens = shape["batch"] * (shape["tokens"] if kind == "llm" else (shape["image_size"] // 16) ** 2 + 1)
    flops = 4 * frozen_params(lm) * tokens  # forward 2NT + input-gradient backward 2NT
    peak = chip_peak(device)
    fisher = fisher_speedup(lm, task, batch, device, tiny)
    return {
        "model": "ViT-B/16 shape" if kind == "vit" else "SmolLM2-135M shape",
        "tiny": tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "device": costs.device,
        "batch": costs.batch_shape,
        "calibration_seconds": calibration_seconds,
        "frozen_model_bytes": costs.model_bytes,
        "rows": rows,
        "all_layer_step_tflops": flops / every["measured_step_seconds"] / 1e12,
        "model_flop_utilisation": None if peak is None else flops / every["measured_step_seconds"] / peak,
        "fisher": fisher,
    }


def fisher_speedup(
    lm: AdaptedModel, task: Task, batch: dict[str, torch.Tensor], device: torch.device, tiny: bool
) -> dict[str, Any]:
    """Vectorised per-sample gradients against the per-sample loop, on a proxy set of the batch."""
    torch.manual_seed(1)
    for name in lm.lora_params:
        if ".lora_B." in name:
            torch.nn.init.normal_(lm.parameter(name), std=0.02)  # as after training (B = 0 at init)
    examples = next(iter(batch.values())).shape[0]
    data = _BatchData(batch)
    indices = np.arange(examples)
    out: dict[str, Any] = {}
    scores = {}
    for mode in ("vectorised", "loop"):
        cfg = FisherOptions(computation=mode, batch_size=examples)
        times = []
        for _ in range(1 if tiny else 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            scores[mode] = fisher_layer_scores(lm, _FixedTask(task, data), data, indices, device, cfg, seed=0)  # type: ignore[arg-type]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[f"{mode}_seconds"] = float(np.median(times))
    out["speedup"] = out["loop_seconds"] / out["vectorised_seconds"]
    ref = np.abs(scores["loop"]).max()
    out["largest_relative_difference"] = float(np.abs(scores["vectorised"] - scores["loop"]).max() / ref)
    return out


class _BatchData:
    """A fixed batch posing as a task's encoded data (rows selected by index)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch


class _FixedTask:
    """The model's task with `collate` serving rows of the fixed batch and every length equal."""

    def __init__(self, task: Task, data: _BatchData) -> None:
        self._task = task
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def lengths(self, data: Any) -> np.ndarray:
        return np.ones(next(iter(self._data.batch.values())).shape[0], dtype=np.int64)

    def collate(self, data: Any, indices: Any, generator: Any = None) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(np.asarray(indices), device=next(iter(self._data.batch.values())).device)
        return {k: v[rows] for k, v in self._data.batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run on any device)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--models", default="vit,llm,llm1b")
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device (use --device cpu --tiny for a smoke run)")
    dtype = getattr(torch, args.dtype)
    kinds = args.models.split(",")
    results = [run_model(k, device, args.tiny, args.steps, dtype) for k in kinds if k != "llm1b"]
    quantised = quantised_llm(device, args.tiny, args.steps) if "llm1b" in kinds else None
    for r in results:
        print(
            f"{r['model']} on {r['device']}, batch {r['batch']}: calibration {r['calibration_seconds']:.1f} s"
        )
        for row in r["rows"]:
            print(
                f"  {row['allocation']:<14} step {row['measured_step_seconds'] * 1e3:8.1f} ms (predicted "
                f"{row['step_error']:+.1%})  peak {row['measured_peak_bytes'] / 2**20:8.1f} MiB (predicted "
                f"{row['peak_error']:+.1%}){'  [probe]' if row['probe'] else ''}"
            )
        mfu = r["model_flop_utilisation"]
        print(
            f"  all-layer step {r['all_layer_step_tflops']:.1f} TFLOP/s"
            + ("" if mfu is None else f", model FLOP utilisation {mfu:.1%}")
        )
        f = r["fisher"]
        print(
            f"  Fisher: vectorised {f['vectorised_seconds']:.3f} s, loop {f['loop_seconds']:.3f} s, "
            f"speed-up {f['speedup']:.1f}x, largest relative difference {f['largest_relative_difference']:.1e}"
        )
    if quantised is not None:
        print(f"{quantised['model']}, batch {quantised['batch']}:")
        for row in quantised["rows"]:
            print(
                f"  {row['base']:<10} checkpointing {'on ' if row['checkpointing'] else 'off'} {row['allocation']:<10} "
                f"frozen {row['frozen_model_bytes'] / 2**20:8.1f} MiB  peak {row['peak_bytes'] / 2**20:8.1f} MiB  "
                f"step {row['step_seconds'] * 1e3:8.1f} ms"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"models": results, "quantised_llm": quantised}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
