"""Run by tests/test_memory.py in a fresh process: train one client of a mid-size random BERT on
one allocation and print, as JSON, fedhello's account of training memory next to the process's
own peak resident-set increase during training (an independent measurement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedhello.config import ExperimentConfig, LoraSettings, TrainConfig
from fedhello.data import TokenizedExamples
from fedhello.engine.client import train_client
from fedhello.method.base import Assignment
from fedhello.models import add_lora
from fedhello.tasks.text_classification import TextClassification


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main(layers: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=160,
        num_labels=4,
    )
    lm = add_lora(BertForSequenceClassification(cfg), LoraSettings(r=8), seed=0)
    rng = np.random.default_rng(0)
    data = TokenizedExamples(
        [rng.integers(1, 1000, size=128).astype(np.int32) for _ in range(32)],
        rng.integers(0, 4, size=32).astype(np.int64),
    )
    task = TextClassification(ExperimentConfig())
    train = TrainConfig(local_steps=2, batch_size=16)
    state = lm.lora_state()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    result = train_client(
        lm, task, data, np.arange(32), state, Assignment(0, layers), train,
        train_head=True, seed=0, round_number=1, device=torch.device("cpu"),
    )  # fmt: skip
    peak = status_kib("VmHWM")
    print(json.dumps({"meter_bytes": result.peak_memory_bytes, "rss_increase_bytes": (peak - before) * 1024}))


if __name__ == "__main__":
    main(tuple(int(x) for x in sys.argv[1].split(",")))
