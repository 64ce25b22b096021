"""How well the calibrated cost model predicts (docs/budgets.md, "Accuracy of the cost model").

For MiniLM (6 blocks) and MPNet (12 blocks), offline, on the default config (16 x 64 tokens):
calibrate on this machine (4 probe layer sets), then measure layer sets that were not probes
(different counts and lowest blocks) for a few steps on the worst-case batch, and compare:
- peak memory (frozen model + what training adds) and training memory, predicted vs measured
  (fedhello's exact CPU account, the same one runs record);
- median step time, predicted vs measured;
- two cross-checks of the account: PyTorch's profiler (`profile_memory`) tracks every CPU tensor
  allocation and free during one step, whose running sum peaks at the live-tensor peak (the
  account plus the transient working set); and a separate process per set trains it and reports
  the increase of its peak resident set (VmHWM after resetting it; the weights are paged in by
  a no-grad forward pass first) during training.

    .venv/bin/python benchmarks/cost_model.py [--models minilm,mpnet] [--steps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def held_out_sets(num_layers: int) -> list[tuple[int, ...]]:
    """Layer sets with different counts and lowest blocks, none of them a calibration probe."""
    L = num_layers
    candidates = [
        (L - 2, L - 1),
        (L - 3,),
        (1,),
        tuple(range(1, L, 2)),
        tuple(range(0, L, 2)),
        tuple(range(2, L)),
        tuple(range(1, L)),
        tuple(range(0, L // 3)),
        tuple(range(L // 3, 2 * L // 3)),
        (L // 2 - 1, L - 1),
    ]
    probes = {(L - 1,), (0,), tuple(range(L // 2, L)), tuple(range(L))}
    return [s for s in dict.fromkeys(candidates) if s and s not in probes]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def rss_probe(model: str, layers: tuple[int, ...], steps: int) -> dict[str, int]:
    """(In a separate process) one measured layer set: the account and the peak RSS increase."""
    from fedhello.config import load_config
    from fedhello.engine.calibration import measure, worst_case_batch
    from fedhello.engine.experiment import prepare_experiment

    exp = prepare_experiment(load_config(None, [f"model.name={model}"]))
    batch = worst_case_batch(exp)
    with torch.no_grad():  # page the memory-mapped weights in: what RSS then gains is training's
        exp.task.loss(exp.adapted.model, batch)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    probe = measure(exp, layers, steps, batch)
    peak = _status_kib("VmHWM")
    return {"meter_bytes": probe.training_bytes, "rss_increase_bytes": (peak - before) * 1024}


def live_tensor_peak(exp: Any, layers: tuple[int, ...], batch: dict[str, Any]) -> int:
    """The peak of live CPU tensor bytes during one training step (after a warm-up step), from
    the allocation and free events of PyTorch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    from fedhello.engine.calibration import measure

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        measure(exp, layers, 1, batch)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    return int(np.cumsum([b for _, b in events]).max())


def run_model(model: str, steps: int) -> dict[str, Any]:
    from fedhello.config import load_config
    from fedhello.engine.calibration import calibrate, measure, worst_case_batch
    from fedhello.engine.experiment import prepare_experiment

    exp = prepare_experiment(load_config(None, [f"model.name={model}"]))
    costs = calibrate(exp)
    batch = worst_case_batch(exp)
    rows = []
    for layers in held_out_sets(costs.num_layers):
        m = measure(exp, layers, steps, batch)
        pred_train = costs.training_bytes(layers)
        pred_step = costs.seconds_per_step(layers)
        rss = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-probe",
                model,
                ",".join(map(str, layers)),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cross = json.loads(rss.stdout.strip().splitlines()[-1])
        live = live_tensor_peak(exp, layers, batch)
        rows.append(
            {
                "layers": list(layers),
                "predicted_peak_bytes": costs.model_bytes + pred_train,
                "measured_peak_bytes": costs.model_bytes + m.training_bytes,
                "peak_error": (costs.model_bytes + pred_train) / (costs.model_bytes + m.training_bytes) - 1,
                "predicted_training_bytes": pred_train,
                "measured_training_bytes": m.training_bytes,
                "training_error": pred_train / m.training_bytes - 1,
                "predicted_step_seconds": pred_step,
                "measured_step_seconds": m.seconds_per_step,
                "step_error": pred_step / m.seconds_per_step - 1,
                "live_tensor_peak_bytes": live,
                "rss_increase_bytes": cross["rss_increase_bytes"],
                "account_over_live": m.training_bytes / live,
                "account_over_rss": cross["meter_bytes"] / cross["rss_increase_bytes"],
            }
        )
        r = rows[-1]
        print(
            f"{model:<7} {','.join(map(str, layers)):<26} peak {r['predicted_peak_bytes'] / 2**20:7.1f} / "
            f"{r['measured_peak_bytes'] / 2**20:7.1f} MiB ({r['peak_error']:+.1%})  train "
            f"{r['predicted_training_bytes'] / 2**20:6.1f} / {r['measured_training_bytes'] / 2**20:6.1f} MiB "
            f"({r['training_error']:+.1%})  step {pred_step:.3f} / {m.seconds_per_step:.3f} s "
            f"({r['step_error']:+.1%})  live peak {live / 2**20:6.1f} MiB  RSS increase "
            f"{cross['rss_increase_bytes'] / 2**20:6.1f} MiB (account/live {r['account_over_live']:.2f}, "
            f"account/RSS {r['account_over_rss']:.2f})",
            flush=True,
        )
    return {
        "model": model,
        "num_layers": costs.num_layers,
        "batch": costs.batch_shape,
        "device": costs.device,
        "frozen_model_bytes": costs.model_bytes,
        "memory_coef": costs.memory_coef,
        "time_coef": costs.time_coef,
        "probes": [list(p.layers) for p in costs.probes],
        "rows": rows,
        "largest_peak_error": max(abs(r["peak_error"]) for r in rows),
        "largest_training_error": max(abs(r["training_error"]) for r in rows),
        "median_step_error": float(np.median([abs(r["step_error"]) for r in rows])),
        "largest_step_error": max(abs(r["step_error"]) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,mpnet")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/cost_model.json")
    parser.add_argument("--rss-probe", nargs=2, metavar=("MODEL", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        model, layers = args.rss_probe
        print(json.dumps(rss_probe(model, tuple(int(x) for x in layers.split(",")), args.steps)))
        return
    results = [run_model(m, args.steps) for m in args.models.split(",")]
    for r in results:
        print(
            f"{r['model']}: {len(r['rows'])} held-out layer sets; peak memory error at most "
            f"{r['largest_peak_error']:.2%} (training memory {r['largest_training_error']:.2%}); step time "
            f"error median {r['median_step_error']:.1%}, at most {r['largest_step_error']:.1%}"
        )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
