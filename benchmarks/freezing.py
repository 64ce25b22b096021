"""Does training fewer LoRA layers really cost less? Per-client step time and peak memory.

For each model and layer allocation, a fresh worker process loads the model, trains one client
with fedhello's own `train_client` for a few steps on real Wikipedia texts, and reports:
- the median step time after warm-up;
- peak training memory, two ways: fedhello's exact account (activations saved for backward,
  gradients, optimizer state) and the process's peak resident memory above its level just
  before training (Linux VmHWM after resetting it);
- bytes uploaded (the trained tensors).
Allocations: all layers, top half, bottom half, every other layer, and the released code's
"learning rate 0" pseudo-freezing of the top half. A short federated run then reports the
framework overhead: round wall time against the clients' pure training plus evaluation time.

The vision model `vit-b16` is a ViT-B/16-shaped model (12 blocks, hidden 768, random weights:
no pretrained vision weights install here) trained through the image task on 32x32 images
resized per batch to 224x224, as CIFAR-100 is; its allocations are all layers, the top half,
and the triangle and bottleneck layer sets of budget 6 of 12. The causal LM `smollm2`
(SmolLM2-135M-Instruct, 30 blocks) trains through the instruction task on Wikipedia topic
questions; its "all" worker also times one evaluation (response loss and greedy answers).

    python benchmarks/freezing.py                       # MiniLM (6 blocks) and MPNet (12 blocks)
    python benchmarks/freezing.py --models vit-b16 --batch-size 8 --overhead-rounds 0
    python benchmarks/freezing.py --models smollm2 --batch-size 8 --seq-len 128 --overhead-rounds 0
    python benchmarks/freezing.py --models minilm --steps 4 --markdown docs/freezing-benchmark.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ALLOCATIONS = ("all", "top_half", "bottom_half", "every_other", "lr0_top_half")
VISION_MODELS = ("vit-b16",)
VISION_ALLOCATIONS = ("all", "top_half", "triangle_half", "bottleneck_half")
LM_MODELS = ("smollm2",)
LM_ALLOCATIONS = ("all", "top_half", "bottom_half", "bottleneck_half")


def layers_for(allocation: str, num_layers: int) -> tuple[list[int], str]:
    from fedhello.method.allocation import geometric_layers

    half = num_layers // 2
    table = {
        "all": (list(range(num_layers)), "real"),
        "top_half": (list(range(half, num_layers)), "real"),
        "bottom_half": (list(range(half)), "real"),
        "every_other": (list(range(0, num_layers, 2)), "real"),
        "lr0_top_half": (list(range(half, num_layers)), "lr0"),
        "triangle_half": (list(geometric_layers("triangle", half, num_layers)), "real"),
        "bottleneck_half": (list(geometric_layers("bottleneck", half, num_layers)), "real"),
    }
    return table[allocation]


def pseudo_freezing(lm: Any, received: Any, assignment: Any, cfg: Any, local: Any, train_head: bool) -> Any:
    """The released code's "freezing" (`train_client(setup_fn=pseudo_freezing)`): every adapter
    requires grad and sits in the optimizer, the untrained ones at learning rate 0, so autograd
    reaches block 0 and every adapter gets a gradient and AdamW state. Not a mode of fedhello
    runs: it exists to measure what real freezing saves."""
    import torch

    from fedhello.engine.client import setup_training

    setup = setup_training(lm, received, assignment, cfg, local, train_head)
    every = lm.trained_names(range(lm.num_layers), train_head)
    untrained = [setup.params[k] for k in every if k not in set(setup.keys)]
    for p in untrained:
        p.requires_grad_(True)
    trained = [setup.params[k] for k in setup.keys]
    setup.optimizer = torch.optim.AdamW(
        [{"params": trained}, {"params": untrained, "lr": 0.0}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    setup.optimized = trained + untrained
    setup.lowest = 0
    return setup


def lm_setup(seq_len: int) -> tuple[Any, Any, Any, Any]:
    """SmolLM2-135M-Instruct (30 blocks, GGUF) with LoRA, and Wikipedia topic questions as
    instruction examples cut to `seq_len` tokens (the prompt is cut, the answer kept)."""
    from fedhello.config import ExperimentConfig
    from fedhello.models import add_lora
    from fedhello.tasks.causal_lm import CausalLM

    cfg = ExperimentConfig.model_validate(
        {
            "task": "causal-lm",
            "model": {"name": "smollm2", "max_length": seq_len},
            "data": {"max_examples": 400},
        }
    )
    task = CausalLM(cfg)
    examples = task.load_examples()
    lm = add_lora(task.load_model(examples), cfg.lora, seed=0, head=False)
    return lm, task, task.encode(examples), cfg


def vision_setup(batch_size: int, steps: int, warmup: int) -> tuple[Any, Any, Any, int]:
    """A ViT-B/16-shaped classifier (random weights, 100 classes) with LoRA, its task, and random
    32x32 RGB images that the task resizes per batch to 224x224."""
    import numpy as np

    from fedhello.config import ExperimentConfig, LoraSettings
    from fedhello.data.images import ImageExamples, ImageStore
    from fedhello.models import add_lora
    from fedhello.tasks.image_classification import ImageClassification

    n = batch_size * (steps + warmup)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=n * 32 * 32 * 3, dtype=np.uint8)
    store = ImageStore(pixels, np.arange(n, dtype=np.int64) * 32 * 32 * 3, np.tile([32, 32, 3], (n, 1)))
    examples = ImageExamples(store, rng.integers(0, 100, size=n), [f"class{i}" for i in range(100)])
    cfg = ExperimentConfig.model_validate(
        {"task": "image-classification", "model": {"name": "vit-b16", "architecture": {"model_type": "vit"}}}
    )
    task = ImageClassification(cfg)
    lm = add_lora(task.load_model(examples), LoraSettings(), seed=0)
    return lm, task, examples, n


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(
    model: str, allocation: str, steps: int, warmup: int, batch_size: int, seq_len: int
) -> dict[str, Any]:
    """Runs in its own process so that memory figures do not leak between allocations."""
    import numpy as np
    import torch

    from fedhello.config import DataConfig, ExperimentConfig, LoraSettings, ModelConfig, TrainConfig
    from fedhello.data import load_examples, tokenize_examples
    from fedhello.engine.client import setup_training, train_client
    from fedhello.method.aggregation import payload_bytes
    from fedhello.method.base import Assignment
    from fedhello.models import add_lora, load_classifier
    from fedhello.tasks.text_classification import TextClassification

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    generation: dict[str, float] | None = None
    if model in VISION_MODELS:
        lm, task, data, n = vision_setup(batch_size, steps, warmup)
        mean_tokens = None
    elif model in LM_MODELS:
        lm, task, data, lm_cfg = lm_setup(seq_len)
        n = batch_size * (steps + warmup)
        mean_tokens = float(np.mean(task.lengths(data)[:n]))
        if allocation == "all":
            generation = generation_cost(lm, task, data, lm_cfg)
    else:
        examples = load_examples(DataConfig())
        base, tokenizer = load_classifier(
            ModelConfig(name=model, max_length=seq_len), len(examples.label_names), 0
        )
        lm = add_lora(base, LoraSettings(), seed=0)
        n = batch_size * (steps + warmup)
        rng = np.random.default_rng(0)
        pick = rng.choice(len(examples.texts), size=n, replace=False)
        texts = [examples.texts[i] for i in pick]
        # every example padded-free but long enough: the benchmark measures full-length sequences
        data = tokenize_examples(tokenizer, texts, examples.labels[pick], seq_len, None)
        mean_tokens = float(np.mean([len(t) for t in data.input_ids]))
        task = TextClassification(ExperimentConfig())
        task.pad_id = int(tokenizer.pad_token_id or 0)
    layers, freezing = layers_for(allocation, lm.num_layers)
    cfg = TrainConfig(local_steps=steps + warmup, batch_size=batch_size)
    device = torch.device("cpu")
    state = lm.lora_state()
    rss_before = _proc_status_kib("VmRSS")
    can_reset = _reset_peak_rss()
    result = train_client(
        lm,
        task,
        data,
        np.arange(n),
        state,
        Assignment(0, tuple(layers)),
        cfg,
        train_head=True,
        seed=0,
        round_number=1,
        device=device,
        setup_fn=pseudo_freezing if freezing == "lr0" else setup_training,
    )
    peak_rss = _proc_status_kib("VmHWM")
    measured = result.step_seconds[warmup:]
    keys = lm.trained_names(layers, True)
    return {
        "model": model,
        "measured": time.strftime("%Y-%m-%d"),
        "batch_size": batch_size,
        "num_layers": lm.num_layers,
        "allocation": allocation,
        "layers": layers,
        "freezing": freezing,
        "trainable_params": sum(lm.parameter(k).numel() for k in keys),
        "step_seconds_median": statistics.median(measured),
        "step_seconds_all": measured,
        "train_memory_bytes": result.peak_memory_bytes,
        "activation_memory_bytes": result.activation_memory_bytes,
        "rss_increase_bytes": (peak_rss - rss_before) * 1024 if can_reset else None,
        "upload_bytes": payload_bytes(result.update.deltas),
        "mean_tokens": mean_tokens,
        "generation": generation,
    }


def generation_cost(lm: Any, task: Any, data: Any, cfg: Any, examples: int = 64) -> dict[str, float]:
    """What one evaluation of a causal LM costs: the response loss and greedy answers
    (lm.max_new_tokens new tokens at most) on `examples` examples, batch 32."""
    import numpy as np
    import torch

    rows = np.arange(len(task.lengths(data)) - examples, len(task.lengths(data)))
    device = torch.device("cpu")
    start = time.perf_counter()
    task.generate(lm.model, data, rows, 32, device)
    generate = time.perf_counter() - start
    start = time.perf_counter()
    task.evaluate(lm.model, data, rows, 32, device)
    evaluate = time.perf_counter() - start
    return {
        "examples": examples,
        "max_new_tokens": cfg.lm.max_new_tokens,
        "generate_seconds": generate,
        "evaluate_seconds": evaluate,
    }


def overhead_run(rounds: int) -> dict[str, Any]:
    """A short federated MiniLM run; overhead = round wall time - client training - evaluation."""
    from fedhello import load_config, run_experiment
    from fedhello.records import read_records

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"federation.rounds={rounds}",
                "federation.clients_per_round=3",
                "train.local_steps=6",
                "data.val_size=200",
                "data.test_size=300",
                "eval.every=1",
                "quiet=true",
            ],
        )
        summary = run_experiment(cfg, Path(tmp) / "run")
        records = read_records(Path(tmp) / "run" / "metrics.jsonl")
    rows = []
    for r in records:
        fisher = r.extra_seconds  # the Fisher refresh, the only extra of these methods
        evaluation = r.eval_seconds or 0.0
        round_seconds = r.round_seconds or 0.0
        pure = r.train_seconds + evaluation + fisher
        rows.append(
            {
                "round": r.round,
                "round_seconds": round_seconds,
                "train_seconds": r.train_seconds,
                "eval_seconds": evaluation,
                "fisher_seconds": fisher,
                "overhead_fraction": (round_seconds - pure) / round_seconds,
            }
        )
    return {"rounds": rows, "overall_fraction": summary["framework_overhead_fraction"]}


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def to_markdown(
    results: list[dict[str, Any]], overhead: dict[str, Any] | None, args: argparse.Namespace
) -> str:
    lines = [
        "# Freezing benchmark: what a client that trains fewer LoRA layers really saves",
        "",
        f"Measured on {platform.machine()} CPU, {os.cpu_count()} cores, "
        f"torch threads {os.environ.get('BENCH_THREADS', '2')}; batch {args.batch_size}, sequence length "
        f"{args.seq_len} (real Wikipedia texts, truncated), LoRA r=16 on query and value, head trained; "
        f"{args.steps} measured steps after {args.warmup} warm-up step(s), each allocation in a fresh process "
        "(the vision model's settings are in its heading).",
        "Produced by `python benchmarks/freezing.py` (see its docstring).",
        "",
        "- *step time*: median seconds per optimizer step; *ratio* is against `all` of the same model.",
        "- *train memory*: fedhello's exact account of activations saved for backward, gradients and",
        "  optimizer state (what training adds on top of the frozen model); *activations*: the saved",
        "  activations alone (n/a in runs made before they were reported separately).",
        "- *RSS increase*: the process's peak resident memory during training above its level just",
        "  before (Linux VmHWM), which also includes allocator slack and temporaries.",
        "- `lr0_top_half` is the released code's pseudo-freezing: every adapter requires grad, the",
        "  untrained ones get learning rate 0.",
        "",
        "Reading it: the backward pass must reach the lowest trained block, so what a client saves",
        "depends on where its layers are, not only how many. Training the top half skips the autograd",
        "graph of the lower blocks: clearly less time and about half the training memory. The bottom",
        "half and every other layer include block 0, so they still run a backward through every",
        "block and save only the adapters' own gradients and optimizer state. Pseudo-freezing saves",
        "nothing. Uploads shrink with the number of trained adapters (the classification head, trained",
        "by every client, is a fixed part of each upload).",
        "",
        "The vision and causal-LM rows come from separate runs (`python benchmarks/freezing.py --models vit-b16",
        "--batch-size 8 --overhead-rounds 0`; `--models smollm2 --batch-size 8 --seq-len 128`), merged into",
        "the same JSON. The ViT's two geometric layer sets",
        "of budget 6 (triangle: blocks 0-5; bottleneck: blocks 0-2 and 9-11) both contain block 0, so",
        "like `bottom_half` they pay for a backward pass through every block.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        ref = next(r for r in rows if r["allocation"] == "all")
        title = f"## {model} ({ref['num_layers']} blocks)"
        if model in VISION_MODELS:
            batch = rows[0].get("batch_size", args.batch_size)
            title += f": ViT-B/16 shape, random weights, 224x224 inputs, batch {batch}"
        if model in LM_MODELS:
            batch = rows[0].get("batch_size", args.batch_size)
            title += (
                f": instruction tuning (Wikipedia topic questions, chat template, mean "
                f"{ref.get('mean_tokens') or 0:.0f} tokens), batch {batch}"
            )
        if ref.get("measured"):
            title += f" (measured {ref['measured']})"
        lines += [
            title,
            "",
            "| allocation | layers | trainable params | step time (s) | ratio | train memory (MiB) | ratio "
            "| activations (MiB) | ratio | RSS increase (MiB) | upload (KiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            act, ref_act = r.get("activation_memory_bytes"), ref.get("activation_memory_bytes")
            act_ratio = f"{act / ref_act:.2f}" if act and ref_act else "n/a"
            lines.append(
                f"| {r['allocation']} | {','.join(map(str, r['layers']))} | {r['trainable_params']:,} "
                f"| {r['step_seconds_median']:.3f} | {r['step_seconds_median'] / ref['step_seconds_median']:.2f} "
                f"| {_mib(r['train_memory_bytes'])} | {r['train_memory_bytes'] / ref['train_memory_bytes']:.2f} "
                f"| {_mib(act)} | {act_ratio} "
                f"| {_mib(r['rss_increase_bytes'])} | {r['upload_bytes'] / 1024:.0f} |"
            )
        lines.append("")
        gen = ref.get("generation")
        if gen:
            lines += [
                f"Evaluation cost: greedy answers (at most {gen['max_new_tokens']} new tokens) for "
                f"{gen['examples']} examples take {gen['generate_seconds']:.1f} s; a whole evaluation of them "
                f"(response loss, then the answers) {gen['evaluate_seconds']:.1f} s, batch 32.",
                "",
            ]
    if overhead is not None:
        lines += [
            "## Framework overhead (in-process engine)",
            "",
            "A short federated MiniLM run with the default method (3 clients per round, 6 local steps each,",
            "evaluation every round). Overhead = round wall time - clients' pure training time - evaluation",
            "time - server-side Fisher scoring (what remains: sampling, allocation, state copies, screening,",
            "aggregation, checkpoint, metrics).",
            "",
            "| round | round (s) | client training (s) | evaluation (s) | Fisher (s) | overhead |",
            "|---|---|---|---|---|---|",
        ]
        for r in overhead["rounds"]:
            lines.append(
                f"| {r['round']} | {r['round_seconds']:.2f} | {r['train_seconds']:.2f} | {r['eval_seconds']:.2f} "
                f"| {r['fisher_seconds']:.2f} | {100 * r['overhead_fraction']:.2f}% |"
            )
        lines += ["", f"Whole run: overhead {100 * overhead['overall_fraction']:.2f}% of the round time.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,mpnet", help="comma-separated fedhello model names")
    parser.add_argument(
        "--allocations", help=f"default: {','.join(ALLOCATIONS)} (vision: {','.join(VISION_ALLOCATIONS)})"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--overhead-rounds", type=int, default=4, help="0 skips the overhead run")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write raw results to this file")
    parser.add_argument("--from-json", help="re-render the Markdown from a --json file of an earlier run")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ALLOCATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.batch_size, args.seq_len)))
        return 0

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        md = to_markdown(saved["results"], saved["overhead"], args)
        print(md)
        if args.markdown:
            Path(args.markdown).write_text(md)
        return 0

    results = []
    for model in filter(None, args.models.split(",")):
        default = (
            VISION_ALLOCATIONS
            if model in VISION_MODELS
            else LM_ALLOCATIONS
            if model in LM_MODELS
            else ALLOCATIONS
        )
        for allocation in (args.allocations or ",".join(default)).split(","):
            cmd = [sys.executable, __file__, "--worker", model, allocation]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(
                f"{model:8s} {allocation:13s} step {row['step_seconds_median']:.3f}s  "
                f"train memory {_mib(row['train_memory_bytes'])} MiB  RSS +{_mib(row['rss_increase_bytes'])} MiB  "
                f"upload {row['upload_bytes'] / 1024:.0f} KiB",
                flush=True,
            )
            results.append(row)
    overhead = overhead_run(args.overhead_rounds) if args.overhead_rounds > 0 else None
    if overhead is not None:
        for r in overhead["rounds"]:
            print(
                f"round {r['round']}: {r['round_seconds']:.2f}s, overhead {100 * r['overhead_fraction']:.2f}%"
            )
    md = to_markdown(results, overhead, args)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "overhead": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
