"""Text classification: a sequence classifier (BERT, MiniLM, MPNet, ...) with a new head.

Metrics (fedhello/tasks/classification.py): accuracy (micro-F1 for single-label data, as LEDGAR
results are usually reported), macro-F1 (LEDGAR's other headline number) and the mean
cross-entropy. The trivial baseline always predicts the split's most frequent class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.config import DataConfig
from fedhello.data import TextExamples, TokenizedExamples, load_examples, pad_batch, tokenize_examples
from fedhello.data.tokenize import pad_to_length
from fedhello.errors import UserError
from fedhello.tasks import register_task
from fedhello.tasks.base import Examples
from fedhello.tasks.classification import Classification


@register_task
class TextClassification(Classification):
    name = "text-classification"
    export_auto_class = "AutoModelForSequenceClassification"

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
                f"data.proxy_path: {path}: labels not in the training data: {', '.join(unknown[:5])}"
            )
        labels = np.array([ids[extra.label_names[y]] for y in extra.labels], dtype=np.int64)
        # proxy examples belong to no domain (-1); they never go to a client
        domains = None
        if examples.domains is not None:
            domains = np.concatenate([examples.domains, np.full(len(extra), -1, dtype=np.int64)])
        merged = TextExamples(
            examples.texts + extra.texts,
            np.concatenate([examples.labels, labels]),
            examples.label_names,
            domains,
            examples.domain_names,
        )
        start = len(examples.texts)
        return merged, np.arange(start, start + len(extra.texts))

    def load_model(self, examples: Examples) -> nn.Module:
        from fedhello.models import load_classifier

        model, self.tokenizer = load_classifier(
            self.cfg.model, num_labels=len(examples.label_names), seed=self.cfg.seed, device=self.cfg.device
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        return model

    def encode(self, examples: Examples) -> TokenizedExamples:
        assert isinstance(examples, TextExamples) and self.tokenizer is not None
        return tokenize_examples(
            self.tokenizer,
            examples.texts,
            examples.labels,
            self.cfg.model.max_length,
            str(self.cfg.data.cache_folder("tokens")),
        )

    def lengths(self, data: TokenizedExamples) -> np.ndarray:
        return np.array([len(ids) for ids in data.input_ids])

    def collate(
        self,
        data: TokenizedExamples,
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        chunk = np.asarray(indices)
        batch = pad_batch([data.input_ids[i] for i in chunk], data.labels[chunk], self.pad_id)
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def worst_case_batch(
        self, data: TokenizedExamples, indices: np.ndarray, batch_size: int
    ) -> dict[str, Tensor]:
        """A full batch of `model.max_length` tokens, every one attended."""
        batch = super().worst_case_batch(data, indices, batch_size)
        return pad_to_length(batch, self.cfg.model.max_length, self.pad_id)

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def save_preprocessing(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def summary_notes(self, examples: Examples) -> dict[str, Any]:
        dropped = examples.dropped if isinstance(examples, TextExamples) else 0
        return {**super().summary_notes(examples), "dropped_examples": dropped}
