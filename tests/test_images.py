"""Image classification: sources and their cache, preprocessing, the domain partition, and the
whole federated path on a small randomly initialised ViT with real Fashion-MNIST images."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import strip_timing, train_first_client
from PIL import Image

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.config import DataConfig, PartitionConfig
from fedhello.data.images import load_image_examples
from fedhello.data.partition import domain_client_counts, partition_indices
from fedhello.data.transforms import ImagePreprocessing
from fedhello.engine.experiment import prepare_experiment
from fedhello.errors import UserError


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def _folder(root: Path, domains: list[str] | None = None, per_class: int = 6) -> Path:
    """root/<class>/<image> (or root/<domain>/<class>/<image>) with images of mixed sizes and modes."""
    for d, domain in enumerate(domains or [""]):
        for c, name in enumerate(["cat", "dog", "fox"]):
            for i in range(per_class):
                mode = ("L", "RGB", "RGBA")[i % 3]
                size = (20 + 3 * i, 16 + 2 * c)
                _write_image(root / domain / name / f"{i}.png", size, mode, 100 * d + 10 * c + i)
    return root


# --- sources and the cache ---------------------------------------------------------------------


def test_image_folder_decodes_once_at_native_size(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    cfg = DataConfig(source="image_folder", path=str(root), cache_dir=str(tmp_path / "cache"))
    examples = load_image_examples(cfg)
    assert examples.label_names == ["cat", "dog", "fox"]
    assert len(examples) == 18 and np.bincount(examples.labels).tolist() == [6, 6, 6]
    assert examples.domains is None
    first = examples.images.image(0)
    with Image.open(root / "cat" / "0.png") as original:
        assert first.shape == (original.height, original.width, 1)  # greyscale stays 1 channel
        np.testing.assert_array_equal(first[:, :, 0], np.asarray(original))
    assert examples.images.image(2).shape[2] == 3  # RGBA -> RGB
    assert isinstance(examples.images.pixels, np.memmap)
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 1

    # a second load reads the cache; a changed file is decoded again (a new cache entry)
    again = load_image_examples(cfg)
    np.testing.assert_array_equal(again.images.image(5), examples.images.image(5))
    _write_image(root / "dog" / "0.png", (9, 9), "RGB", 7)
    changed = load_image_examples(cfg)
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 2
    assert changed.images.image(6).shape == (9, 9, 3)


def test_corrupt_image_is_reported_with_its_path_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path / "pets", per_class=3)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = DataConfig(source="image_folder", path=str(root), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        examples = load_image_examples(cfg)
    assert len(examples) == 9
    assert len(examples.skipped) == 1 and str(bad) in examples.skipped[0]
    assert str(bad) in caplog.text


def test_image_source_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    base = ["partition", "task=image-classification", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main([*base, "data.source=image_folder", f"data.path={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no images found" in err and str(tmp_path / "empty") in err

    assert main([*base, "data.source=fashion_mnist", f"data.path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get install -y dataset-fashion-mnist" in err

    assert main([*base, "data.source=csv", "data.path=x.csv"]) == 2
    assert "task image-classification reads" in capsys.readouterr().err


def _image_dataset(n: int = 12, label_feature: Any = None) -> Any:
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": label_feature or datasets.ClassLabel(names=["apple", "bee", "cloud"]),
            "coarse_label": datasets.Value("int64"),
        }
    )
    labels: list[Any] = [i % 3 for i in range(n)]
    if label_feature is not None:
        labels = [["zebra", "ant", "moth"][i % 3] for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": images, "fine_label": labels, "coarse_label": [0] * n}, features=features
    )


def test_saved_dataset_goes_through_load_from_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _image_dataset().save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(
        source="hf",
        path=str(tmp_path / "saved"),
        image_column="img",
        label_column="fine_label",
        cache_dir=str(tmp_path / "cache"),
    )
    examples = load_image_examples(cfg)
    assert examples.label_names == ["apple", "bee", "cloud"]  # the dataset's own class names
    assert examples.labels.tolist() == [i % 3 for i in range(12)]
    assert examples.images.image(0).shape == (10, 12, 3)

    base = ["partition", "task=image-classification", "data.source=hf", f"data.path={tmp_path / 'saved'}"]
    capsys.readouterr()  # save_to_disk's progress bar
    assert main([*base, "data.image_column=img", "data.label_column=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing column 'nope'" in err and "fine_label" in err


def test_hub_dataset_by_name_selects_columns_and_maps_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None) -> Any:
        calls.append((path, name, split))
        return _image_dataset(label_feature=datasets.Value("string"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(
        source="hf",
        path="cifar100",
        image_column="img",
        label_column="fine_label",
        hf_split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    examples = load_image_examples(cfg)
    assert calls == [("cifar100", None, "train")]
    assert examples.label_names == ["ant", "moth", "zebra"]  # string labels: sorted names
    names = [examples.label_names[y] for y in examples.labels]
    assert names == [["zebra", "ant", "moth"][i % 3] for i in range(12)]


def test_fashion_mnist_and_digits(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    fm = load_image_examples(DataConfig(source="fashion_mnist", cache_dir=str(tmp_path)))
    assert len(fm) == 70_000 and fm.images.image(0).shape == (28, 28, 1)
    assert np.bincount(fm.labels).tolist() == [7000] * 10 and fm.label_names[9] == "Ankle boot"
    digits = load_image_examples(DataConfig(source="digits", cache_dir=str(tmp_path)))
    assert len(digits) == 1797 and digits.images.image(0).shape == (8, 8, 1)
    assert digits.images.pixels.max() == 255 and digits.label_names == [str(d) for d in range(10)]


# --- preprocessing ----------------------------------------------------------------------------


def test_preprocessing_resizes_converts_channels_and_augments_reproducibly() -> None:
    from transformers import CLIPImageProcessor, ViTImageProcessor

    grey = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40, 1)
    vit = ImagePreprocessing.from_processor(ViTImageProcessor(size={"height": 16, "width": 16}), channels=3)
    out = vit([grey, np.zeros((5, 7, 3), dtype=np.uint8)])
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0, 0], out[0, 1])  # greyscale copied to the three channels
    assert float(out[1].min()) == pytest.approx(-1.0)  # black -> (0 - 0.5) / 0.5
    assert torch.equal(vit([grey]), vit([grey], torch.Generator().manual_seed(1)))  # augment off

    clip = CLIPImageProcessor(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12})
    pre = ImagePreprocessing.from_processor(clip, channels=3)
    assert (pre.height, pre.width, pre.resize) == (12, 12, 12)
    assert pre([grey]).shape == (1, 3, 12, 12)

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one = ImagePreprocessing(16, 16, 1, augment=True, min_scale=0.3)
    a = one([rgb] * 4, torch.Generator().manual_seed(5))
    b = one([rgb] * 4, torch.Generator().manual_seed(5))
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, one([rgb] * 4, torch.Generator().manual_seed(6)))
    assert not torch.equal(a[0], one([rgb])[0])  # training crops differ from the evaluation view


# --- domains ----------------------------------------------------------------------------------


def test_domain_partition_keeps_each_client_in_one_domain() -> None:
    rng = np.random.default_rng(0)
    domains = np.repeat([0, 1, 2], [600, 300, 100])
    labels = rng.integers(0, 5, size=1000)
    names = ["clipart", "real", "sketch"]
    cfg = PartitionConfig(scheme="domain", num_clients=10)
    assert domain_client_counts(domains, names, cfg).tolist() == [6, 3, 1]
    parts = partition_indices(labels, cfg, 0, domains, names)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert [len(set(domains[p].tolist())) for p in parts] == [1] * 10
    assert [int(domains[p][0]) for p in parts] == [0] * 6 + [1] * 3 + [2]

    skewed = PartitionConfig(scheme="domain", num_clients=4, within_domain="dirichlet", alpha=0.1)
    skewed = skewed.model_copy(update={"domain_clients": {"clipart": 2, "real": 1, "sketch": 1}})
    parts = partition_indices(labels, skewed, 0, domains, names)
    assert [len(p) for p in parts][2:] == [300, 100]
    assert partition_indices(labels, skewed, 0, domains, names)[0].tolist() == parts[0].tolist()

    with pytest.raises(UserError, match="domain_clients: unknown domain 'paint'"):
        domain_client_counts(domains, names, cfg.model_copy(update={"domain_clients": {"paint": 10}}))
    with pytest.raises(UserError, match="cannot cover 3 domains"):
        domain_client_counts(domains, names, cfg.model_copy(update={"num_clients": 2}))
    with pytest.raises(UserError, match="needs data with domains"):
        partition_indices(labels, cfg, 0)


def test_partition_cli_shows_domains_of_an_image_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _folder(tmp_path / "domainnet", domains=["clipart", "sketch"], per_class=10)
    argv = [
        "partition",
        "task=image-classification",
        "data.source=domain_folder",
        f"data.path={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_size=6",
        "data.test_size=6",
        "fisher.proxy_size=6",
        "partition.scheme=domain",
        "partition.num_clients=4",
        "federation.clients_per_round=2",
    ]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["domain"] for c in out["clients"]] == ["clipart", "clipart", "sketch", "sketch"]
    assert out["total"] == 60 - 18 and out["label_names"] == ["cat", "dog", "fox"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "domain" in table and table.count("sketch") == 2


def test_three_wikipedia_languages_are_three_domains_of_one_label_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "partition",
        "data.language=[en-us, fr-fr, es-es]",
        "partition.scheme=domain",
        "partition.num_clients=6",
    ]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label_names"] == [
        "Arts",
        "Everyday life",
        "Geography",
        "History",
        "Mathematics",
        "People",
        "Philosophy and religion",
        "Technology",
    ]
    assert [c["domain"] for c in out["clients"]] == ["en-us"] * 2 + ["es-es"] * 2 + ["fr-fr"] * 2
    assert all(c["num_classes"] == 8 for c in out["clients"])


# --- the federated path on a tiny ViT ---------------------------------------------------------


def test_vit_allocation_freezing_and_partial_upload(image_overrides: Callable[..., list[str]]) -> None:
    exp = prepare_experiment(load_config(None, image_overrides()))
    assert exp.num_layers == 4 and all("classifier" in k for k in exp.adapted.head_params)
    assert exp.adapted.model.config.id2label[0] == "T-shirt/top"  # the new head names its classes

    top = train_first_client(exp, (3,), local_steps=2)
    full = train_first_client(exp, (0, 1, 2, 3), local_steps=2)
    assert top.peak_memory_bytes < 0.5 * full.peak_memory_bytes  # activations from block 3 up only
    sent = set(top.update.deltas)
    assert sent == set(exp.adapted.trained_names((3,), True))
    assert all(".layers.3." in k or "classifier" in k for k in sent)
    assert set(full.update.deltas) > sent


def test_vit_run_resumes_exactly_and_is_reproducible(
    image_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    cfg = load_config(None, image_overrides("method=rgd-bottleneck", "data.augment=true"))
    full = run_experiment(cfg, tmp_path / "full")
    assert full["task"] == "image-classification" and full["pretrained"] is True
    assert full["skipped_images"] == 0 and full["rounds_completed"] == 3
    records = _records(tmp_path / "full")
    budgets = {c["group"]: len(c["layers"]) for r in records for c in r["clients"]}
    assert all(budgets[g] <= {"low": 2, "mid": 3, "high": 4}[g] for g in budgets)
    assert len({c["bytes_up"] for r in records for c in r["clients"]}) > 1  # partial uploads differ

    def interrupt(round_number: int, record: object) -> None:
        if round_number == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", on_round_end=interrupt)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True)
    assert strip_timing(_records(tmp_path / "cut")) == strip_timing(records)
    assert resumed["final_test_accuracy"] == full["final_test_accuracy"]
    for name in ("accuracy.png", "layer_frequency.png", "summary.json"):
        assert (tmp_path / "full" / name).is_file()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray cluster at a time (tests/test_flower.py)
def test_vit_flower_simulation_round_equals_in_process(
    image_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    from helpers import run_simulated

    overrides = image_overrides(
        "federation.rounds=1", "partition.num_clients=3", "federation.clients_per_round=3"
    )
    run_experiment(load_config(overrides=overrides), tmp_path / "local")
    proc = run_simulated(overrides, tmp_path / "sim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    local, sim = _records(tmp_path / "local"), _records(tmp_path / "sim")
    assert len(sim) == 1
    assert sim[0]["metrics"]["test"] == pytest.approx(local[0]["metrics"]["test"], abs=1e-6)
    assert [c["bytes_up"] for c in sim[0]["clients"]] == [c["bytes_up"] for c in local[0]["clients"]]


@pytest.mark.slow
def test_offline_fashion_mnist_config_is_reproducible(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """configs/fashion-mnist-vit.yaml, shortened to 3 rounds: a not-pretrained ViT beats chance and
    two runs with one seed give identical metrics."""
    config = Path(__file__).parent.parent / "configs" / "fashion-mnist-vit.yaml"
    short = ["federation.rounds=3", f"data.cache_dir={tmp_path / 'cache'}", "quiet=true"]
    a = run_experiment(load_config(config, short), tmp_path / "a")
    run_experiment(load_config(config, short), tmp_path / "b")
    assert a["pretrained"] is False
    assert a["final_test_accuracy"] > 0.3  # chance is 0.10; 0.44 after 3 rounds (0.54 after 4)
    assert strip_timing(_records(tmp_path / "a")) == strip_timing(_records(tmp_path / "b"))


def test_image_task_calibrates_on_a_full_batch(
    image_overrides: Callable[..., list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_calibration: None,
) -> None:
    from fedhello.engine.calibration import calibrated, measure, worst_case_batch

    monkeypatch.setenv("FEDHELLO_CACHE_DIR", str(tmp_path))
    exp = prepare_experiment(load_config(None, image_overrides()))
    assert worst_case_batch(exp)["pixel_values"].shape[0] == exp.cfg.train.batch_size
    costs = calibrated(exp)
    m = measure(exp, (1, 2), steps=1)
    assert costs.training_bytes((1, 2)) == pytest.approx(m.training_bytes, rel=0.02)
