"""FLoRA: the merged update is the weighted sum of the clients' own products (whatever their
ranks, with the scaling each client trained with), the next round starts from fresh adapters on
the merged base, and a FLoRA run reproduces, respects budgets and exports the merged model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.config import LoraSettings
from fedhello.engine.checkpoint import load_checkpoint
from fedhello.method.aggregation import ClientUpdate
from fedhello.method.base import Assignment, MethodContext, RoundPlan
from fedhello.method.flora import FLoRA
from fedhello.method.rank import is_lora_a, partner_b, rank_slice
from fedhello.models import AdaptedModel, add_lora
from fedhello.models.lora import base_weight_name

RANK, ALPHA = 8, 16


def _llama() -> AdaptedModel:
    # q_proj 32 -> 32 and v_proj 32 -> 16 (two key/value heads): square and non-square merges
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        num_hidden_layers=2,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return add_lora(LlamaForSequenceClassification(config), LoraSettings(r=RANK, alpha=ALPHA), seed=0)


def _client_values(lm: AdaptedModel, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A client's trained LoRA values at `rank`, zero-padded as a rank-r_k client holds them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in lm.lora_params:
        full = lm.parameter(name)
        values = torch.zeros_like(full)
        part = rank_slice(name, values, rank)
        part.copy_(torch.randn(part.shape, generator=g) * 0.3)
        out[name] = values
    return out


def _module_change(lm: AdaptedModel, values: dict[str, torch.Tensor], name_a: str) -> torch.Tensor:
    """What the adapted linear of `name_a` adds to its base, as a matrix (out x in), measured by
    running the module on the identity: the client's own function, whatever the scaling."""
    lm.load_lora_state(values)
    module = lm.model.get_submodule(name_a.split(".lora_A.")[0])
    base = lm.model.get_submodule(name_a.split(".lora_A.")[0] + ".base_layer")
    module.eval()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        return (module(eye) - base(eye)).T.double()


def test_the_merge_is_the_weighted_sum_of_each_clients_own_update_for_mixed_ranks() -> None:
    lm = _llama()
    start = lm.lora_state(with_base=True)
    ranks = {0: 2, 1: 4, 2: 8}
    samples = {0: 10, 1: 30, 2: 60}
    trained = {c: _client_values(lm, r, seed=c) for c, r in ranks.items()}  # zero-padded beyond r
    ctx = MethodContext(lm.num_layers, [lm.num_layers], [1.0], seed=3, lora_scaling=ALPHA / RANK)
    plan = RoundPlan(1, {c: Assignment(c, tuple(range(lm.num_layers)), r) for c, r in ranks.items()})
    # what a rank-r client uploads: the change of its slices from the slices it downloaded
    updates = [
        ClientUpdate(
            c,
            {k: rank_slice(k, trained[c][k], r) - rank_slice(k, start[k], r) for k in lm.lora_params},
            samples[c],
        )
        for c, r in ranks.items()
    ]
    new = FLoRA("flora", ctx).aggregate(start, updates, plan, "samples")

    total = sum(samples.values())
    for name_a in [k for k in lm.lora_params if is_lora_a(k)]:
        base = base_weight_name(name_a)
        # each client's own function (its module run on the identity), weighted by its data
        expected = start[base].double() + sum(
            samples[c] / total * _module_change(lm, trained[c], name_a) for c in ranks
        )
        torch.testing.assert_close(new[base].double(), expected, atol=1e-6, rtol=0)
        # the same with the scaling written out: s * sum_k p_k B_k A_k, s = alpha / r
        by_hand = sum(
            samples[c] / total * (trained[c][partner_b(name_a)].double() @ trained[c][name_a].double())
            for c in ranks
        )
        torch.testing.assert_close(
            new[base].double() - start[base].double(), ALPHA / RANK * by_hand, atol=1e-6, rtol=0
        )
        # the next round starts from fresh adapters: B zero, A new and drawn as peft draws it
        assert torch.count_nonzero(new[partner_b(name_a)]) == 0
        assert not torch.equal(new[name_a], start[name_a])
        assert float(new[name_a].abs().max()) <= 1 / start[name_a].shape[1] ** 0.5
    assert new.keys() == start.keys()
    # a rank-2 client's function is not rescaled by anyone else's rank: alone, it is merged as is
    alone = FLoRA("flora", ctx).aggregate(start, updates[:1], plan, "samples")
    name_a = next(k for k in lm.lora_params if is_lora_a(k) and "v_proj" in k)
    torch.testing.assert_close(
        alone[base_weight_name(name_a)].double() - start[base_weight_name(name_a)].double(),
        _module_change(lm, trained[0], name_a),
        atol=1e-6,
        rtol=0,
    )


def test_a_flora_run_reproduces_merges_the_base_and_exports_the_merged_model(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    over = tiny_overrides("method=flora", "federation.rounds=2")
    first = run_experiment(load_config(None, over), tmp_path / "a")
    second = run_experiment(load_config(None, over), tmp_path / "b")
    assert first["final_test_accuracy"] == second["final_test_accuracy"]
    rounds = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    ranks = {c["rank"] for r in rounds for c in r["clients"]}
    assert len(ranks) > 1, ranks  # heterogeneous ranks really trained
    # the global state holds the merged base weights, and every client downloads them
    state = load_checkpoint(tmp_path / "a" / "checkpoint").global_state
    base_bytes = sum(
        v.numel() * v.element_size() for k, v in state.items() if k.endswith("base_layer.weight")
    )
    assert base_bytes > 0
    assert all(c["bytes_down"] > base_bytes + c["bytes_up"] // 2 for r in rounds for c in r["clients"])

    assert main(["export", str(tmp_path / "a"), "--to", str(tmp_path / "out"), "--check"]) == 0
    said = capsys.readouterr().out
    assert "merged model" in said and "flora changes the base weights" in said, said
    diff = float(said.split("test examples: ")[1].split()[0])
    assert diff < 1e-4, said
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "adapter_config.json").exists()
