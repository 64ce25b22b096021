"""What the frozen base's precision buys (docs/quantization.md): frozen-model bytes, training memory
of the top-half and the all-layer set, step time, and the cost model's memory error on layer
sets it was not calibrated on, for SmolLM2-135M and MPNet, with the base in float32, int8 or nf4,
activation checkpointing off and on, and bf16 (plain and nf4) for the 4-bit ratio.

    .venv/bin/python benchmarks/quantization.py [--models smollm2,mpnet] [--out benchmarks/results/quantization.json]

SmolLM2 runs on its offline instruction config (configs/smollm2-instruct.yaml: 30 blocks) at batch
4 x 64 tokens, MPNet on the reference MPNet config (benchmarks/configs/reference-mpnet.yaml: 12
blocks, batch 16 x 32). Memory is the CPU meter's exact account (docs/budgets.md), so one probe
pass is enough for it; step times are medians of 2 steps on a shared machine: read them as
ratios within one model, measured in this one process. The combination rows are the issue's
none / int8 / nf4 x checkpointing off / on at the device's default precision (float32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import fedhello.engine.calibration as calibration
from fedhello.config import load_config
from fedhello.engine.experiment import prepare_experiment

MODELS = {
    # SmolLM2 at batch 4 x 64 tokens (the config's 8 x 128 would take hours of CPU per combination
    # here: the worst-case batch computes the LM head over every position)
    "smollm2": ("configs/smollm2-instruct.yaml", ["train.batch_size=4", "model.max_length=64"]),
    "mpnet": ("benchmarks/configs/reference-mpnet.yaml", []),
}
COMBINATIONS = [
    ("float32", "none", False),
    ("float32", "none", True),
    ("float32", "int8", False),
    ("float32", "int8", True),
    ("float32", "nf4", False),
    ("float32", "nf4", True),
    ("bfloat16", "none", False),
    ("bfloat16", "nf4", False),
    ("bfloat16", "nf4", True),
]
MiB = 2**20


def held_out_sets(num_layers: int) -> list[tuple[int, ...]]:
    """Layer sets that are not calibration probes: a quarter from the middle, the top three
    quarters, and every other block of the top half."""
    L = num_layers
    return [
        tuple(range(L // 4, L // 2)),
        tuple(range(L // 4, L)),
        tuple(range(L // 2, L, 2)),
    ]


def measure_combination(
    config: str, dtype: str, quantization: str, checkpointing: bool, extra: list[str]
) -> dict[str, Any]:
    overrides = [
        *extra,
        f"model.dtype={dtype}",
        f"model.quantization={quantization}",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
        "quiet=true",
    ]
    exp = prepare_experiment(load_config(config, overrides))
    L = exp.num_layers
    start = time.perf_counter()
    costs = calibration.calibrate(exp, steps=1)
    calibrate_seconds = time.perf_counter() - start
    top_half, everything = tuple(range(L // 2, L)), tuple(range(L))
    probes = {p.layers: p for p in costs.probes}
    measured = {"top_half": probes[top_half], "all": probes[everything]}
    timed = {name: calibration.measure(exp, layers, steps=2) for name, layers in
             [("top_half", top_half), ("all", everything)]}  # fmt: skip
    errors, peak_error = [], []
    for layers in held_out_sets(L):
        probe = calibration.measure(exp, layers, steps=1)
        errors.append(costs.training_bytes(layers) / probe.training_bytes - 1)
        real_peak = costs.model_bytes + probe.training_bytes
        peak_error.append(costs.predict(layers, 1).memory_bytes / real_peak - 1)
    return {
        "dtype": dtype,
        "quantization": quantization,
        "checkpointing": checkpointing,
        "frozen_model_bytes": costs.model_bytes,
        "training_bytes": {k: v.training_bytes for k, v in measured.items()},
        "step_seconds": {k: v.seconds_per_step for k, v in timed.items()},
        "held_out_sets": [list(s) for s in held_out_sets(L)],
        "held_out_training_memory_error": errors,
        "held_out_peak_memory_error": peak_error,
        "calibration_seconds": calibrate_seconds,
    }


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for model, rows in results.items():
        lines += [
            f"\n{model}:",
            "| base | checkpointing | frozen model | train memory, top half | train memory, all layers "
            "| step, top half | step, all layers | cost model's worst peak-memory error (held out) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            base = r["quantization"] if r["quantization"] != "none" else ""
            base = f"{base} / {r['dtype']}" if base else r["dtype"]
            worst = max(r["held_out_peak_memory_error"], key=abs)
            lines.append(
                f"| {base} | {'on' if r['checkpointing'] else 'off'} | {r['frozen_model_bytes'] / MiB:.1f} MiB "
                f"| {r['training_bytes']['top_half'] / MiB:.1f} MiB | {r['training_bytes']['all'] / MiB:.1f} MiB "
                f"| {r['step_seconds']['top_half']:.2f} s | {r['step_seconds']['all']:.2f} s | {worst:+.1%} |"
            )
        by = {(r["dtype"], r["quantization"], r["checkpointing"]): r for r in rows}
        bf16, nf4_bf16 = by.get(("bfloat16", "none", False)), by.get(("bfloat16", "nf4", False))
        plain, ckpt = by.get(("float32", "none", False)), by.get(("float32", "none", True))
        if bf16 and nf4_bf16:
            ratio = nf4_bf16["frozen_model_bytes"] / bf16["frozen_model_bytes"]
            lines.append(f"\nnf4 frozen model / bf16 frozen model: {ratio:.3f}")
        if plain and ckpt:
            cut = 1 - ckpt["training_bytes"]["all"] / plain["training_bytes"]["all"]
            lines.append(f"checkpointing cuts the all-layer training memory by {cut:.1%}")
        worst_all = max((abs(e) for r in rows for e in r["held_out_peak_memory_error"]), default=0.0)
        lines.append(f"largest peak-memory error of the cost model on held-out sets: {worst_all:.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,mpnet")
    parser.add_argument("--out", default="benchmarks/results/quantization.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    calibration.PROBE_PASSES = 1  # memory is exact on CPU; the times are ratios, not a calibration
    calibration.MAX_ATTEMPTS = 1
    out = Path(args.out)
    results: dict[str, list[dict[str, Any]]] = json.loads(out.read_text()) if out.is_file() else {}
    for model in args.models.split(","):
        config, model_overrides = MODELS[model]
        done = {(r["dtype"], r["quantization"], r["checkpointing"]) for r in results.get(model, [])}
        for combination in COMBINATIONS:
            if combination in done:
                continue
            extra = [*model_overrides, *([] if args.threads is None else [f"threads={args.threads}"])]
            row = measure_combination(config, *combination, extra)
            results.setdefault(model, []).append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))  # resumable: finished combinations are kept
            print(f"{model} {combination}: done", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
