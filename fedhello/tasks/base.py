"""The task interface: what is learned and how it is measured.

A task turns a data source's examples into model inputs, batches them, computes the training
loss, evaluates a model (a dict of named metrics per split), names its primary metric and
whether higher is better, scores the trivial baseline (what a model that learned nothing
gets), and gives the per-example objective whose gradients make the Fisher layer scores
(docs/method.md, "Fisher scores"). Engines, methods, summaries, reports and the grid only
talk to a task through this interface, so a new task is one module and one registration.

The life of a task in a run (`fedhello/engine/experiment.py`):

    task = build_task(cfg)
    examples = task.load_examples()                # raw examples + a class/category per example
    model = task.load_model(examples)              # a transformers model with the task's head
    data = task.encode(examples)                   # encoded once (tokens, pixels, ...)
    for batch in batches(task, data, indices, 16, order): loss = task.loss(model, batch)
    task.evaluate(model, data, indices, 128, device) -> {"accuracy": ..., "loss": ...}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.errors import UserError

if TYPE_CHECKING:
    from fedhello.config import ExperimentConfig
    from fedhello.method.fisher import FisherOptions


class Examples(Protocol):
    """What every task's examples offer the rest of the code: a class (or category) per example,
    used to stratify splits, partition clients by label and score the trivial baseline."""

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def label_names(self) -> list[str]: ...

    @property
    def domains(self) -> np.ndarray | None:
        """A domain id per example (language, image style, task category), or None."""

    @property
    def domain_names(self) -> list[str]: ...

    def __len__(self) -> int: ...


class Task(ABC):
    """One kind of learning problem. Subclass, set the class attributes, implement the methods,
    and register it with `fedhello.tasks.register_task`."""

    name: ClassVar[str]
    # the metric model selection and reports lead with; a task may set both per instance (causal-lm)
    primary_metric: str
    higher_is_better: bool = True
    has_head: ClassVar[bool] = True  # a freshly initialised output head that clients may train
    trivial_baseline_name: ClassVar[str] = "trivial"  # e.g. "majority_class" (summary key prefix)
    pretrained: bool = True  # False when load_model built random weights: reports say "not pretrained"
    bucket_by_length: ClassVar[bool] = False  # training batches of similar lengths (less padding)
    export_auto_class: ClassVar[str] = "AutoModel"  # the transformers class that loads an export

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's keyword inputs of a batch (everything but the targets)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def save_preprocessing(self, folder: Path) -> None:  # noqa: B027 (optional hook, nothing by default)
        """Save what turns raw inputs into model inputs (tokenizer, image processor) next to an export."""

    def summary_notes(self, examples: Examples) -> dict[str, Any]:
        """Facts about the run's model and data that its summary records (e.g. skipped images)."""
        return {"pretrained": self.pretrained}

    @abstractmethod
    def load_examples(self) -> Examples:
        """The examples of `cfg.data`, in a fixed order (a seed alone decides splits)."""

    def load_proxy_examples(self, examples: Examples, path: str) -> tuple[Examples, np.ndarray]:
        """`examples` plus a separate proxy file appended; returns (merged, indices of the proxy).
        Tasks that cannot read one keep this default: a one-line error naming the setting."""
        raise UserError(f"data.proxy_path: task {self.name} cannot read a separate proxy file")

    @abstractmethod
    def load_model(self, examples: Examples) -> nn.Module:
        """The foundation model with the task's head (seeded from `cfg.seed`); keeps what
        `encode` and `collate` need (tokenizer, pad id, image processor) on `self`."""

    @abstractmethod
    def encode(self, examples: Examples) -> Any:
        """Model inputs for every example, computed once per run."""

    @abstractmethod
    def lengths(self, data: Any) -> np.ndarray:
        """A length per encoded example; evaluation batches examples of similar length."""

    @abstractmethod
    def collate(
        self, data: Any, indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One batch of model inputs (and targets) for these examples. During training `generator`
        is the client's seeded generator, which a task may draw from to augment its inputs;
        evaluation and Fisher scoring pass None (deterministic inputs)."""

    def worst_case_batch(self, data: Any, indices: np.ndarray, batch_size: int) -> dict[str, Tensor]:
        """The costliest training batch a client can meet (what budgets are calibrated on): by
        default the `batch_size` longest of these examples; tasks that pad override it to pad
        to the longest input they allow."""
        longest = indices[np.argsort(-self.lengths(data)[indices], kind="stable")[:batch_size]]
        return self.collate(data, longest)

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The mean training loss of a batch (a scalar with a graph)."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: Any, indices: np.ndarray, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Named metrics of `model` on these examples; must include `primary_metric` and "loss"."""

    @abstractmethod
    def trivial_baseline(self, examples: Examples, indices: np.ndarray) -> dict[str, float]:
        """The metrics of the task's trivial predictor on these examples (same names as evaluate)."""

    @abstractmethod
    def fisher_objective(
        self, model: nn.Module, batch: dict[str, Tensor], options: FisherOptions, uniforms: Tensor
    ) -> Tensor:
        """Per-example objective (shape [batch]) whose squared gradients make the diagonal Fisher:
        the log-likelihood of the target under `options` (see docs/method.md). `uniforms` holds one
        uniform draw per example for sampling targets from the model (`options.labels == "model"`)."""


BUCKET_BATCHES = 16  # length bucketing sorts windows of this many batches


def batches(
    task: Task,
    data: Any,
    indices: np.ndarray,
    batch_size: int,
    order: torch.Generator | None,
) -> Iterator[dict[str, Tensor]]:
    """Batches of the given examples: shuffled by `order`, or in length order (evaluation).

    A task with `bucket_by_length` trains on length buckets: the shuffled examples are sorted
    by length within windows of `BUCKET_BATCHES` batches, and the batches are then shuffled, so
    batches stay random but carry little padding."""
    if order is not None:
        idx = indices[torch.randperm(len(indices), generator=order).numpy()]
        if task.bucket_by_length:
            lengths = task.lengths(data)
            window = batch_size * BUCKET_BATCHES
            parts = [idx[i : i + window] for i in range(0, len(idx), window)]
            idx = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts]) if parts else idx
            chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
            for k in torch.randperm(len(chunks), generator=order).tolist():
                yield task.collate(data, chunks[k], order)
            return
    else:
        lengths = task.lengths(data)[indices]
        idx = indices[np.argsort(lengths, kind="stable")]
    for start in range(0, len(idx), batch_size):
        yield task.collate(data, idx[start : start + batch_size], order)
