"""Everything a run needs before round 1: data, model with LoRA, partitions, groups, strategy.

Both engines build the same `Experiment` from the same config, so they start from identical
state: the same examples, the same partition, the same adapters' initial values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from fedhello.config import DataConfig, ExperimentConfig, HetLoRAConfig
from fedhello.data import (
    TextExamples,
    TokenizedExamples,
    load_examples,
    partition_indices,
    split_examples,
    tokenize_examples,
)
from fedhello.errors import UserError
from fedhello.method.allocation import AllocationStrategy, build_strategy
from fedhello.method.groups import ResourceGroup, assign_clients_to_groups, resolve_groups
from fedhello.method.methods import method_spec
from fedhello.models import LoraModel, add_lora, load_classifier
from fedhello.seeding import Stream, numpy_rng


@dataclass
class Experiment:
    cfg: ExperimentConfig
    examples: TextExamples
    tokens: TokenizedExamples
    splits: dict[str, np.ndarray]  # indices into `tokens` for train / val / test / proxy
    client_indices: list[np.ndarray]  # each client's training examples (indices into `tokens`)
    lm: LoraModel
    pad_id: int
    groups: list[ResourceGroup]
    client_group: np.ndarray  # group index of each client
    strategy: AllocationStrategy
    device: torch.device

    @property
    def num_layers(self) -> int:
        return self.lm.num_layers

    @property
    def train_head(self) -> bool:
        return self.cfg.federation.head == "aggregate"

    def budget_of(self, client: int) -> int:
        return self.groups[int(self.client_group[client])].num_layers

    @property
    def rank_pruning(self) -> HetLoRAConfig | None:
        """HetLoRA's self-pruning settings when they apply to this run's clients."""
        spec = method_spec(self.cfg.method)
        return self.cfg.hetlora if spec.aggregation == "hetlora" and self.cfg.hetlora.self_pruning else None

    def rank_of(self, client: int) -> int | None:
        """The client's LoRA rank under a rank-heterogeneous method; None otherwise."""
        if not method_spec(self.cfg.method).rank_heterogeneous:
            return None
        return self.groups[int(self.client_group[client])].rank

    def majority_rate(self, split: str = "test") -> float:
        labels = self.tokens.labels[self.splits[split]]
        return float(np.bincount(labels).max() / len(labels))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device: unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: '{name}' requested but no CUDA device is available")
    return device


def prepare_experiment(cfg: ExperimentConfig) -> Experiment:
    """Load and prepare everything for the run described by `cfg`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    examples = load_examples(cfg.data, seed=cfg.seed)
    splits = split_examples(examples.labels, cfg.data.val_size, cfg.data.test_size, cfg.seed)
    if cfg.fisher.proxy_path is not None:
        examples, splits["proxy"] = _append_proxy_file(examples, cfg)
    else:
        # held out for every method, so that all methods give clients the same data
        splits["train"], splits["proxy"] = _hold_out(splits["train"], cfg.fisher.proxy_size, cfg.seed)
    train = splits["train"]
    if len(train) < cfg.partition.num_clients:
        raise UserError(
            f"partition.num_clients: {cfg.partition.num_clients} clients but only {len(train)} training examples"
        )
    parts = partition_indices(examples.labels[train], cfg.partition, cfg.seed)
    client_indices = [train[p] for p in parts]

    model, tokenizer = load_classifier(cfg.model, num_labels=len(examples.label_names), seed=cfg.seed)
    lm = add_lora(model, cfg.lora, seed=cfg.seed)
    lm.model.to(device)
    cache = cfg.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fedhello", "tokens")
    tokens = tokenize_examples(tokenizer, examples.texts, examples.labels, cfg.model.max_length, cache)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    groups = resolve_groups(cfg.groups, lm.num_layers, cfg.lora.r)
    client_group = assign_clients_to_groups(cfg.partition.num_clients, groups, cfg.seed)
    strategy = build_strategy(
        cfg.method,
        lm.num_layers,
        [g.num_layers for g in groups],
        [g.share for g in groups],
        rounds=cfg.federation.rounds,
        seed=cfg.seed,
        fisher=cfg.fisher,
    )
    return Experiment(
        cfg, examples, tokens, splits, client_indices, lm, int(pad_id), groups, client_group, strategy, device
    )


def _hold_out(train: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if size >= len(train):
        raise UserError(
            f"fisher.proxy_size: {size} proxy examples leave no training data ({len(train)} in all)"
        )
    proxy = numpy_rng(seed, Stream.SPLIT, 2).choice(train, size=size, replace=False)
    return np.setdiff1d(train, proxy), np.sort(proxy)


def _append_proxy_file(examples: TextExamples, cfg: ExperimentConfig) -> tuple[TextExamples, np.ndarray]:
    """Read a separate public proxy file and append it, with labels mapped to the task's label ids."""
    path = str(cfg.fisher.proxy_path)
    source = "jsonl" if path.endswith((".jsonl", ".json")) else "csv"
    proxy_cfg = DataConfig(
        source=source, path=path, text_column=cfg.data.text_column, label_column=cfg.data.label_column
    )
    extra = load_examples(proxy_cfg, seed=cfg.seed)
    ids = {name: i for i, name in enumerate(examples.label_names)}
    unknown = sorted(set(extra.label_names) - set(ids))
    if unknown:
        raise UserError(
            f"fisher.proxy_path: {path}: labels not in the training data: {', '.join(unknown[:5])}"
        )
    labels = np.array([ids[extra.label_names[y]] for y in extra.labels], dtype=np.int64)
    merged = TextExamples(
        examples.texts + extra.texts, np.concatenate([examples.labels, labels]), examples.label_names
    )
    start = len(examples.texts)
    return merged, np.arange(start, start + len(extra.texts))
