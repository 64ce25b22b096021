"""The frozen base's precision (docs/quantization.md): bitsandbytes quantisation, bf16, activation
checkpointing, what the cost model counts for them, `fedhello plan` with and without them, and
the export of a run trained on a quantised base."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import peft
import pytest
import torch

from fedhello.cli import main
from fedhello.config import load_config
from fedhello.engine.calibration import measure, model_bytes
from fedhello.engine.client import train_client
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.errors import UserError
from fedhello.method.base import Assignment
from fedhello.models import precision
from fedhello.models.precision import prepare_base
from fedhello.records import read_records

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is a dependency: scripts/install.sh installs it"
)


@pytest.fixture(scope="module")
def tiny_overrides(
    tiny_overrides: Callable[..., list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., list[str]]:
    """The tiny BERT at hidden size 64: bitsandbytes' 4-bit CPU kernels need whole 64-value
    blocks per row (the shared tiny BERT's 32 would leave nothing quantised)."""
    from conftest import save_tiny_bert

    d = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-64"), hidden_size=64)

    def make(*extra: str) -> list[str]:
        return tiny_overrides(f"model.name={d}", *extra)

    return make


def experiment(tiny_overrides: Callable[..., list[str]], *extra: str) -> Experiment:
    return prepare_experiment(load_config(None, tiny_overrides(*extra)))


def train(exp: Experiment, layers: tuple[int, ...], steps: int = 2) -> dict[str, torch.Tensor]:
    """One client's update from the initial adapters (the model is restored afterwards)."""
    start = exp.adapted.lora_state()
    result = train_client(
        exp.adapted,
        exp.task,
        exp.data,
        exp.client_indices[0],
        start,
        Assignment(0, layers),
        exp.cfg.train.model_copy(update={"local_steps": steps}),
        train_head=True,
        seed=0,
        round_number=1,
        device=exp.device,
    )
    exp.adapted.load_lora_state(start)
    return result.update.deltas


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantised_base_trains_lora_on_bitsandbytes_layers(
    tiny_overrides: Callable[..., list[str]], mode: str
) -> None:
    full = experiment(tiny_overrides)
    quantised = experiment(tiny_overrides, f"model.quantization={mode}")
    layer = quantised.adapted.blocks[0].attention.self.query
    expected = bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(layer, peft.tuners.lora.LoraLayer) and isinstance(layer.base_layer, expected)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters stay float32
    # the frozen model is smaller, counted with bitsandbytes' scales; the LoRA tensors are unchanged
    assert model_bytes(quantised.adapted.model) < model_bytes(full.adapted.model)
    assert quantised.adapted.lora_state().keys() == full.adapted.lora_state().keys()
    deltas = train(quantised, (2, 3))
    full_deltas = train(full, (2, 3))
    assert deltas.keys() == full_deltas.keys()
    for name, delta in deltas.items():
        assert torch.isfinite(delta).all() and delta.abs().sum() > 0, name
    # the quantised base computes nearly, not exactly, what the float32 one does
    total = sum(float((deltas[k] - full_deltas[k]).abs().sum()) for k in deltas)
    assert total > 0


def test_bf16_base_keeps_adapters_and_head_in_float32(tiny_overrides: Callable[..., list[str]]) -> None:
    exp = experiment(tiny_overrides, "model.dtype=bfloat16")
    lm = exp.adapted
    assert lm.blocks[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    assert all(lm.parameter(n).dtype == torch.float32 for n in [*lm.lora_params, *lm.head_params])
    deltas = train(exp, (3,))
    assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in deltas.values())
    fp32 = experiment(tiny_overrides)
    assert model_bytes(lm.model) < 0.6 * model_bytes(fp32.adapted.model)


def test_checkpointing_gives_the_same_update_and_recomputes_only_trained_blocks(
    tiny_overrides: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = experiment(tiny_overrides)
    checkpointed = experiment(tiny_overrides, "train.activation_checkpointing=true")
    for layers in [(2, 3), (0, 1, 2, 3)]:
        a, b = train(plain, layers), train(checkpointed, layers)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    calls: list[int] = []
    real = precision.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(precision, "checkpoint", counting)
    train(checkpointed, (2, 3), steps=1)
    assert len(calls) == 2, "blocks 0 and 1 run without autograd: nothing to checkpoint or recompute"
    # the activations kept for backward shrink to the blocks' inputs plus one recomputed block
    full = measure(plain, (0, 1, 2, 3), steps=1).training_bytes
    less = measure(checkpointed, (0, 1, 2, 3), steps=1).training_bytes
    assert less < 0.8 * full


def test_cost_model_counts_quantised_bytes_and_checkpointing(
    tiny_overrides: Callable[..., list[str]], shared_cache: Path, fast_calibration: None
) -> None:
    from fedhello.engine.calibration import calibrated

    for extra in [
        ("model.quantization=nf4", "train.activation_checkpointing=true"),
        ("model.dtype=bfloat16",),
    ]:
        exp = experiment(tiny_overrides, *extra)
        costs = calibrated(exp)
        assert costs.model_bytes == model_bytes(exp.adapted.model)
        probes = {p.layers for p in costs.probes}
        for layers in [(1, 2), (2,), (0, 3), (1, 2, 3)]:
            assert layers not in probes
            measured = measure(exp, layers, steps=1).training_bytes
            assert costs.training_bytes(layers) == pytest.approx(measured, rel=0.10), (extra, layers)


def budget_groups(low: int, high: int) -> str:
    return (
        f"groups=[{{name: low, share: 1, budget: 1.0, memory: {low}}}, "
        f"{{name: high, share: 1, budget: 1.0, memory: {high}}}]"
    )


def test_plan_shows_more_layers_with_nf4_and_checkpointing_and_a_run_stays_within(
    tiny_overrides: Callable[..., list[str]],
    shared_cache: Path,
    fast_calibration: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedhello.engine.calibration import calibrated

    options = ("model.quantization=nf4", "train.activation_checkpointing=true")
    plain = calibrated(experiment(tiny_overrides))
    # the low budget: what two layers need on the float32 base, so all four never fit there
    low = plain.predict((2, 3), 3).memory_bytes
    everything = plain.predict((0, 1, 2, 3), 3).memory_bytes
    argv = ["plan", *tiny_overrides(budget_groups(low, everything), *options), "--methods", "fedhello"]
    assert main([*argv, "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)["memory_options"]
    assert compared["options"] == "nf4 + activation checkpointing"
    low_row = compared["groups"][0]
    assert low_row["max_layers_with"] > low_row["max_layers_without"] == 2
    assert compared["frozen_model_bytes_with"] < compared["frozen_model_bytes_without"]
    assert main(argv) == 0
    assert "without: up to 2 layers" in capsys.readouterr().out
    out = tmp_path / "run"
    run = [
        "run",
        *tiny_overrides(budget_groups(low, everything), *options, "method=fedra"),
        "--out",
        str(out),
    ]
    assert main(run) == 0
    clients = [c for r in read_records(out / "metrics.jsonl") for c in r.clients]
    assert clients and all(c.over_budget == [] for c in clients)
    assert any(len(c.layers) > 2 for c in clients if c.group == "low"), (
        "nf4 + checkpointing let low train more"
    )


def test_export_of_a_quantised_run_is_an_adapter_of_the_float32_base(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                *tiny_overrides("model.quantization=nf4", "federation.rounds=1", "method=fedra"),
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(run), "--to", str(tmp_path / "adapter"), "--check"]) == 0
    text = capsys.readouterr().out
    diffs = {
        line.split(" from ")[1].split(" on 8")[0]: float(line.rsplit(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("check:")
    }
    quantised, full = diffs["fedhello's model (nf4 base)"], diffs["the full-precision base with the adapter"]
    assert full < 1e-5 < quantised, diffs  # plain peft on the float32 base is exactly that model
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "quantization" not in json.dumps(config)
    assert main(["export", str(run), "--to", str(tmp_path / "merged"), "--merge", "--check"]) == 0
    merged = [line for line in capsys.readouterr().out.splitlines() if "full-precision base" in line]
    assert float(merged[0].rsplit(":", 1)[1]) < 1e-4


def test_unsupported_combinations_are_one_line(
    tiny_overrides: Callable[..., list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*argv: str) -> str:
        assert main(["run", *argv, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = refused(*tiny_overrides("model.quantization=nf4", "method=flora"))
    assert "model.quantization" in err and "flora" in err
    err = refused(*tiny_overrides("model.quantization=q3"))
    assert "model.quantization" in err
    err = refused(*tiny_overrides("model.quantization=nf4", "model.architecture={model_type: vit}"))
    assert "model.quantization" in err and "architecture" in err
    # without bitsandbytes: one line naming the setting and what would work
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = load_config(None, tiny_overrides("model.quantization=nf4"))
    with pytest.raises(UserError, match=r"model.quantization: needs bitsandbytes.*quantization: none"):
        prepare_base(torch.nn.Sequential(torch.nn.Linear(4, 4)), cfg.model, keep_float32=[])


def test_default_precision_changes_nothing(tiny_overrides: Callable[..., list[str]]) -> None:
    """The defaults (float32 on CPU, no quantisation, no checkpointing) load the model as before:
    every weight float32, no bitsandbytes layer, no checkpointed block."""
    exp = experiment(tiny_overrides)
    assert all(p.dtype == torch.float32 for p in exp.adapted.model.parameters())
    assert not any("bitsandbytes" in type(m).__module__ for m in exp.adapted.model.modules())
    assert not any(getattr(b, "_fedhello_checkpointed", False) for b in exp.adapted.blocks)
    assert np.isfinite(model_bytes(exp.adapted.model))
