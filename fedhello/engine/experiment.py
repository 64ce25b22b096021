"""Everything a run needs before round 1: task, data, model with LoRA, partitions, groups, method.

Both engines build the same `Experiment` from the same config, so they start from identical
state: the same examples, the same partition, the same adapters' initial values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedhello.config import ExperimentConfig
from fedhello.data import partition_indices, split_examples
from fedhello.errors import UserError
from fedhello.method.base import ClientProfile, Method, MethodContext
from fedhello.method.budgets import Cost, CostModel, LayerLimits, ceil_steps
from fedhello.method.groups import ResourceGroup, assign_clients_to_groups, resolve_groups
from fedhello.method.registry import build_method, parse_method_options
from fedhello.models import AdaptedModel, add_lora
from fedhello.models.precision import enable_activation_checkpointing
from fedhello.privacy import PrivacyAccounting, resolve_privacy
from fedhello.seeding import SplitPart, Stream, numpy_rng
from fedhello.tasks import Examples, Task, build_task


@dataclass
class Experiment:
    cfg: ExperimentConfig
    task: Task
    examples: Examples
    data: Any  # the task's encoded examples
    splits: dict[str, np.ndarray]  # indices into `data` for train / val / test / proxy
    client_indices: list[np.ndarray]  # each client's training examples (indices into `data`)
    adapted: AdaptedModel
    groups: list[ResourceGroup]
    client_group: np.ndarray  # group index of each client
    method: Method
    device: torch.device
    costs: CostModel | None = None  # calibrated when a group states a device budget (calibration.py)
    privacy: PrivacyAccounting | None = None  # differential privacy, resolved (docs/privacy.md)

    @property
    def num_layers(self) -> int:
        return self.adapted.num_layers

    @property
    def train_head(self) -> bool:
        """Whether clients train (and the server averages) the task's head."""
        return self.task.has_head and self.cfg.federation.head == "aggregate"

    def group_of(self, client: int) -> ResourceGroup:
        return self.groups[int(self.client_group[client])]

    def profile(self, client: int) -> ClientProfile:
        """What the method may know of a client: its group's layer budget and rank, and, when
        its group states device budgets, the layer sets they allow."""
        group = self.group_of(client)
        return ClientProfile(budget=group.budget, rank=group.rank, limits=self.limits(client))

    def client_steps(self, client: int) -> int:
        """Local steps this client takes in a round."""
        t = self.cfg.train
        return ceil_steps(len(self.client_indices[client]), t.batch_size, t.local_epochs, t.local_steps)

    def group_steps(self, group: int) -> int:
        """The most local steps any client of a group takes in a round."""
        members = np.flatnonzero(self.client_group == group)
        return max((self.client_steps(int(c)) for c in members), default=1)

    def limits(self, client: int) -> LayerLimits | None:
        """The layer sets this client's device budgets allow (None: its group states none)."""
        group = self.group_of(client)
        if self.costs is None or not group.device_budget.constrained:
            return None
        return self.costs.limits(group.device_budget, self.client_steps(client))

    def predicted_cost(self, client: int, layers: Sequence[int], rank: int | None) -> Cost | None:
        """The cost model's prediction for a client's assignment (None without a cost model)."""
        if self.costs is None or not layers:
            return None
        return self.costs.predict(
            layers, self.client_steps(client), rank, self.group_of(client).device_budget.speed
        )

    def trivial_baseline(self, split: str = "test") -> dict[str, float]:
        """The task's trivial predictor on a split (e.g. always the largest class)."""
        return self.task.trivial_baseline(self.examples, self.splits[split])


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
    privacy = resolve_privacy(cfg)  # before any loading: a budget the run cannot meet is one line
    task = build_task(cfg)

    examples, splits, client_indices = split_and_partition(cfg, task, task.load_examples())

    model = task.load_model(examples)
    adapted = add_lora(model, cfg.lora, seed=cfg.seed, head=task.has_head)
    adapted.model.to(device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(adapted.blocks)
    data = task.encode(examples)

    groups = resolve_groups(cfg.groups, adapted.num_layers, cfg.lora.r)
    client_group = assign_clients_to_groups(cfg.partition.num_clients, groups, cfg.seed)
    method = build_method(cfg.method, method_context(cfg, adapted.num_layers, groups))
    if method.changes_base and cfg.model.quantization != "none":
        raise UserError(
            f"model.quantization: {cfg.method} merges its updates into the base weights, which "
            f"{cfg.model.quantization} would have to re-quantise every round; use quantization: none"
        )
    refusal = method.central_privacy_refusal()  # the method needs individual updates or reports
    if refusal is not None and cfg.secure_aggregation.enabled:
        raise UserError(f"secure_aggregation.enabled: the server sees only sums of updates; {refusal}")
    if refusal is not None and cfg.privacy.mode == "central":
        raise UserError(f"privacy.mode: central needs a noised mean of clipped updates; {refusal}")
    return Experiment(
        cfg,
        task,
        examples,
        data,
        splits,
        client_indices,
        adapted,
        groups,
        client_group,
        method,
        device,
        privacy=privacy,
    )


def method_context(
    cfg: ExperimentConfig, num_layers: int, groups: Sequence[ResourceGroup], method: str | None = None
) -> MethodContext:
    """What a method (the config's, or `method`) is built from for this config; a method other
    than the config's gets its default options (`fedhello plan` builds every method)."""
    name = cfg.method if method is None else method
    return MethodContext(
        num_layers=num_layers,
        budgets=[g.budget for g in groups],
        shares=[g.share for g in groups],
        rounds=cfg.federation.rounds,
        seed=cfg.seed,
        aggregation=cfg.federation.aggregation,
        trim_fraction=cfg.federation.trim_fraction,
        lora_fair=cfg.federation.lora_fair,
        lora_scaling=cfg.lora.alpha / cfg.lora.r,
        options=parse_method_options(name, cfg.method_options if name == cfg.method else {}),
    )


def split_and_partition(
    cfg: ExperimentConfig, task: Task, examples: Examples
) -> tuple[Examples, dict[str, np.ndarray], list[np.ndarray]]:
    """Train / val / test / proxy splits and each client's training examples (indices into the
    returned examples, which include a separate proxy file when `data.proxy_path` names one).
    `fedhello partition` shows exactly this."""
    splits = split_examples(
        examples.labels, cfg.data.val_size, cfg.data.test_size, cfg.seed, examples.domains
    )
    if cfg.data.proxy_path is not None:
        examples, splits["proxy"] = task.load_proxy_examples(examples, str(cfg.data.proxy_path))
    else:
        # held out for every method, so that all methods give clients the same data
        splits["train"], splits["proxy"] = _hold_out(splits["train"], cfg.data.proxy_size, cfg.seed)
    train = splits["train"]
    if len(train) < cfg.partition.num_clients:
        raise UserError(
            f"partition.num_clients: {cfg.partition.num_clients} clients but only {len(train)} training examples"
        )
    domains = None if examples.domains is None else examples.domains[train]
    parts = partition_indices(examples.labels[train], cfg.partition, cfg.seed, domains, examples.domain_names)
    return examples, splits, [train[p] for p in parts]


def _hold_out(train: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if size >= len(train):
        raise UserError(
            f"data.proxy_size: {size} proxy examples leave no training data ({len(train)} in all)"
        )
    proxy = numpy_rng(seed, Stream.SPLIT, SplitPart.PROXY).choice(train, size=size, replace=False)
    return np.setdiff1d(train, proxy), np.sort(proxy)
