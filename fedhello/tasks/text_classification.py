"""Text classification: a sequence classifier (BERT, MiniLM, MPNet, ...) with a new head.

Metrics: accuracy (micro-F1 for single-label data, as LEDGAR results are usually reported),
macro-F1 (the unweighted mean over classes, LEDGAR's other headline number) and the mean
cross-entropy. The trivial baseline always predicts the split's most frequent class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.config import DataConfig, FisherConfig
from fedhello.data import TextExamples, TokenizedExamples, load_examples, pad_batch, tokenize_examples
from fedhello.errors import UserError
from fedhello.tasks.base import Examples, Task, batches
from fedhello.tasks.metrics import macro_f1, majority_class_metrics


class TextClassification(Task):
    name = "text-classification"
    primary_metric = "accuracy"
    higher_is_better = True
    has_head = True
    trivial_baseline_name = "majority_class"

    tokenizer: Any = None
    pad_id: int = 0

    def load_examples(self) -> TextExamples:
        return load_examples(self.cfg.data, seed=self.cfg.seed)

    def load_proxy_examples(self, examples: Examples, path: str) -> tuple[TextExamples, np.ndarray]:
        """Append a separate labelled CSV/JSONL file, its labels mapped to the task's label ids."""
        assert isinstance(examples, TextExamples)
        data = self.cfg.data
        source = "jsonl" if path.endswith((".jsonl", ".json")) else "csv"
        proxy_cfg = DataConfig(
            source=source, path=path, text_column=data.text_column, label_column=data.label_column
        )
        extra = load_examples(proxy_cfg, seed=self.cfg.seed)
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

    def load_model(self, examples: Examples) -> nn.Module:
        from fedhello.models import load_classifier

        model, self.tokenizer = load_classifier(
            self.cfg.model, num_labels=len(examples.label_names), seed=self.cfg.seed
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        return model

    def encode(self, examples: Examples) -> TokenizedExamples:
        assert isinstance(examples, TextExamples) and self.tokenizer is not None
        cache = self.cfg.data.cache_dir or os.path.join(
            os.path.expanduser("~"), ".cache", "fedhello", "tokens"
        )
        return tokenize_examples(
            self.tokenizer, examples.texts, examples.labels, self.cfg.model.max_length, cache
        )

    def lengths(self, data: TokenizedExamples) -> np.ndarray:
        return np.array([len(ids) for ids in data.input_ids])

    def collate(self, data: TokenizedExamples, indices: Sequence[int] | np.ndarray) -> dict[str, Tensor]:
        chunk = np.asarray(indices)
        batch = pad_batch([data.input_ids[i] for i in chunk], data.labels[chunk], self.pad_id)
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        loss: Tensor = model(**batch).loss  # transformers' cross-entropy over the head's logits
        return loss

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        data: TokenizedExamples,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, float]:
        model.eval()
        loss_sum = 0.0
        predicted: list[np.ndarray] = []
        truth: list[np.ndarray] = []
        for batch in batches(self, data, indices, batch_size, None):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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
        self, model: nn.Module, batch: dict[str, Tensor], options: FisherConfig, uniforms: Tensor
    ) -> Tensor:
        """log p(y|x) (or the raw true-class logit), with y from the data (empirical Fisher) or
        sampled from the model by inverting its predictive CDF with `uniforms` (true Fisher)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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
