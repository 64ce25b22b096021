"""Fisher layer scores on the server: vectorised per-sample gradients vs the released per-sample loop.

For each model: 100 real proxy texts (Wikipedia vital articles), LoRA r=16 on query and value
with the B matrices set to small seeded random values (as after some training; at init B = 0
and A gets no gradient), then the layer scores computed both ways. Prints the median time of
each over repeats, the speed-up and the largest relative difference between the two scores.

    python benchmarks/fisher.py                                # MiniLM (6 blocks) and MPNet (12 blocks)
    python benchmarks/fisher.py --models minilm --markdown docs/fisher-benchmark.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def measure(model: str, proxy: int, seq_len: int, repeats: int, loop_repeats: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedhello.config import DataConfig, ExperimentConfig, LoraSettings, ModelConfig
    from fedhello.data import load_examples, tokenize_examples
    from fedhello.method.fisher import FisherOptions, fisher_layer_scores
    from fedhello.models import add_lora, load_classifier
    from fedhello.tasks.text_classification import TextClassification

    examples = load_examples(DataConfig())
    base, tokenizer = load_classifier(
        ModelConfig(name=model, max_length=seq_len), len(examples.label_names), 0
    )
    lm = add_lora(base, LoraSettings(), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in lm.lora_params:
            if "lora_B" in name:
                p = lm.parameter(name)
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    pick = np.random.default_rng(0).choice(len(examples.texts), size=proxy, replace=False)
    tokens = tokenize_examples(
        tokenizer, [examples.texts[i] for i in pick], examples.labels[pick], seq_len, None
    )
    idx = np.arange(proxy)
    device = torch.device("cpu")
    task = TextClassification(ExperimentConfig())
    task.pad_id = int(tokenizer.pad_token_id or 0)

    def timed(method: str) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        opts = FisherOptions(computation=method)  # type: ignore[arg-type]
        scores = fisher_layer_scores(lm, task, tokens, idx, device, opts, 0)
        return time.perf_counter() - start, scores

    timed("vectorised")  # warm-up
    vec = [timed("vectorised") for _ in range(repeats)]
    loop = [timed("loop") for _ in range(loop_repeats)]
    v_scores, l_scores = vec[0][1], loop[0][1]
    rel = float(np.max(np.abs(v_scores - l_scores) / np.maximum(np.abs(l_scores), 1e-30)))
    v_med = statistics.median(t for t, _ in vec)
    l_med = statistics.median(t for t, _ in loop)
    return {
        "model": model,
        "num_layers": lm.num_layers,
        "proxy": proxy,
        "mean_tokens": float(np.mean([len(t) for t in tokens.input_ids])),
        "vectorised_seconds": v_med,
        "loop_seconds": l_med,
        "speedup": l_med / v_med,
        "max_relative_difference": rel,
        "scores": [float(x) for x in v_scores],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,mpnet")
    parser.add_argument("--proxy", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-repeats", type=int, default=2)
    parser.add_argument("--markdown")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rows = []
    for model in args.models.split(","):
        row = measure(model, args.proxy, args.seq_len, args.repeats, args.loop_repeats)
        print(
            f"{model}: vectorised {row['vectorised_seconds']:.2f}s, loop {row['loop_seconds']:.2f}s, "
            f"speed-up {row['speedup']:.1f}x, max relative difference {row['max_relative_difference']:.1e}",
            flush=True,
        )
        rows.append(row)
    lines = [
        "# Fisher scores: vectorised per-sample gradients vs the released per-sample loop",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; {args.proxy} real proxy texts truncated to {args.seq_len} tokens; LoRA r=16 "
        f"on query and value; median of {args.repeats} vectorised and {args.loop_repeats} loop runs. "
        "Produced by `python benchmarks/fisher.py`.",
        "",
        "| model | blocks | mean tokens | vectorised (s) | per-sample loop (s) | speed-up | max relative difference of scores |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['num_layers']} | {r['mean_tokens']:.1f} | {r['vectorised_seconds']:.2f} "
            f"| {r['loop_seconds']:.2f} | {r['speedup']:.1f}x | {r['max_relative_difference']:.1e} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
