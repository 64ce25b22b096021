"""Turning texts into token ids once per run, with an on-disk cache, and padding batches.

Tokenizing every text up front (rather than per batch) keeps client training loops cheap, and the
cache makes repeated runs on the same data start in a moment. The cache key covers everything that
changes the ids (tokenizer, vocabulary size, max_length, the texts), so a stale cache is never used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhello.io import write_atomic

CACHE_FORMAT = "fedhello-tokens-v1"
BATCH_SIZE = 1000


@dataclass
class TokenizedExamples:
    """Unpadded token ids (int32, special tokens included, truncated) and int64 labels."""

    input_ids: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_examples(
    tokenizer: Any,
    texts: list[str],
    labels: np.ndarray | list[int],
    max_length: int,
    cache_dir: str | None = None,
) -> TokenizedExamples:
    """Tokenize all texts in batches (truncation, no padding), reusing a cached result when present.

    `tokenizer` is a Hugging Face (fast) tokenizer. With `cache_dir` the ids are stored in
    `<cache_dir>/<sha256>.npz`; without it nothing is written.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")

    cache_file: Path | None = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{_cache_key(tokenizer, max_length, texts)}.npz"
        cached = _read_cache(cache_file, len(texts))
        if cached is not None:
            return TokenizedExamples(input_ids=cached, labels=labels)

    input_ids: list[np.ndarray] = []
    for start in range(0, len(texts), BATCH_SIZE):
        batch = texts[start : start + BATCH_SIZE]
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding=False)
        input_ids.extend(np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"])

    if cache_file is not None:
        _write_cache(cache_file, input_ids)
    return TokenizedExamples(input_ids=input_ids, labels=labels)


def pad_batch(items: list[np.ndarray], labels: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad token id arrays to the longest one; the attention mask marks real tokens with 1."""
    if not items:
        raise ValueError("pad_batch needs at least one example")
    longest = max(len(x) for x in items)
    input_ids = np.full((len(items), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(items), longest), dtype=np.int64)
    for row, ids in enumerate(items):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _cache_key(tokenizer: Any, max_length: int, texts: list[str]) -> str:
    """sha256 of everything that determines the ids; texts are length-prefixed so joins are unambiguous."""
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    try:
        vocab_size = len(tokenizer)
    except TypeError:
        vocab_size = int(getattr(tokenizer, "vocab_size", 0))
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}\n{name}\n{vocab_size}\n{max_length}\n{len(texts)}\n".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _read_cache(path: Path, expected: int) -> list[np.ndarray] | None:
    """The cached ids, or None if there is no usable cache file (a broken one is just ignored)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            flat = data["ids"]
            offsets = data["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    if len(offsets) != expected + 1:
        return None
    return [flat[offsets[i] : offsets[i + 1]] for i in range(expected)]


def _write_cache(path: Path, input_ids: list[np.ndarray]) -> None:
    """Store ids as one flat array plus offsets, written atomically."""
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(input_ids).astype(np.int32) if input_ids else np.zeros(0, dtype=np.int32)
    write_atomic(path, lambda f: np.savez(f, ids=flat, offsets=offsets))


def pad_to_length(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch widened to `length` tokens with every position attended: the costliest batch of
    that many examples (what budgets are calibrated on). Other entries are kept."""
    ids = batch["input_ids"]
    wide = torch.full((ids.shape[0], max(length, ids.shape[1])), pad_id, dtype=ids.dtype)
    wide[:, : ids.shape[1]] = ids
    return {**batch, "input_ids": wide, "attention_mask": torch.ones_like(wide)}
