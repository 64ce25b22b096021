"""What every single-label classification task shares, whatever its inputs (texts, images).

A subclass says how examples become model inputs (`collate`, `model_inputs`); this base gives
the loss, the metrics (accuracy, which is micro-F1 for single-label data, macro-F1 and the mean
cross-entropy), the majority-class baseline and the Fisher objective log p(y|x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.tasks.base import Examples, Task, batches
from fedhello.tasks.metrics import macro_f1, majority_class_metrics

if TYPE_CHECKING:
    from fedhello.method.fisher import FisherOptions


class Classification(Task):
    primary_metric = "accuracy"
    higher_is_better = True
    has_head = True
    trivial_baseline_name = "majority_class"

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        loss: Tensor = model(**batch).loss  # transformers' cross-entropy over the head's logits
        return loss

    @torch.inference_mode()
    def evaluate(
        self, model: nn.Module, data: Any, indices: np.ndarray, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        model.eval()
        loss_sum = 0.0
        predicted: list[np.ndarray] = []
        truth: list[np.ndarray] = []
        for batch in batches(self, data, indices, batch_size, None):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**self.model_inputs(batch)).logits
            loss_sum += float(
                torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            )
            predicted.append(logits.argmax(-1).cpu().numpy())
            truth.append(batch["labels"].cpu().numpy())
        n = max(len(indices), 1)
        y_pred = np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)
        y_true = np.concatenate(truth) if truth else np.zeros(0, dtype=np.int64)
        return {
            "accuracy": int((y_pred == y_true).sum()) / n,
            "macro_f1": macro_f1(y_true, y_pred),
            "loss": loss_sum / n,
        }

    def trivial_baseline(self, examples: Examples, indices: np.ndarray) -> dict[str, float]:
        return majority_class_metrics(examples.labels[indices])

    def fisher_objective(
        self, model: nn.Module, batch: dict[str, Tensor], options: FisherOptions, uniforms: Tensor
    ) -> Tensor:
        """log p(y|x) (or the raw true-class logit), with y from the data (empirical Fisher) or
        sampled from the model by inverting its predictive CDF with `uniforms` (true Fisher)."""
        logits = model(**self.model_inputs(batch)).logits
        labels = fisher_labels(logits, batch["labels"], uniforms, options.labels)
        scores = logits.float()
        if options.objective == "log_likelihood":
            scores = torch.log_softmax(scores, dim=-1)
        return scores.gather(-1, labels[:, None].long()).squeeze(-1)


def fisher_labels(logits: Tensor, data_labels: Tensor, uniforms: Tensor, mode: str) -> Tensor:
    """The labels the Fisher objective uses: the data's ("empirical"), or ("model") sampled from
    the model's predictive distribution by inverting its CDF with one uniform per example."""
    if mode == "empirical":
        return data_labels.to(logits.device)
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1).cpu()
    sampled = (cdf < uniforms[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
    return sampled.to(logits.device)
