"""LoRA-FAIR (`federation.aggregation=lora_fair`): the correction of the averaged B against the
paper's equations, and a run of a layer-set method with it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedhello import load_config, run_experiment
from fedhello.config import LoraFairSettings
from fedhello.errors import UserError
from fedhello.method.aggregation import ClientUpdate, aggregate_per_tensor
from fedhello.method.lora_fair import correct_module, lora_fair

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
F64 = torch.float64


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))


def test_l2_correction_is_the_ridge_solution_of_a_hand_checked_case() -> None:
    # A = [1 0], B = [2; 0], dW = [3 1; 0 0]: (dW - BA) A^T = [1; 0], A A^T + lam = 2 -> dB = [0.5; 0]
    a = torch.tensor([[1.0, 0.0]], dtype=F64)
    b = torch.tensor([[2.0], [0.0]], dtype=F64)
    ideal = torch.tensor([[3.0, 1.0], [0.0, 0.0]], dtype=F64)
    correction = correct_module(ideal, a, b, LoraFairSettings(similarity="l2", lam=1.0))
    torch.testing.assert_close(correction, torch.tensor([[0.5], [0.0]], dtype=F64))


def test_cosine_correction_turns_the_product_towards_the_ideal_update_and_stays_small() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, generator=g, dtype=F64)
    b = 0.1 * torch.randn(6, 4, generator=g, dtype=F64)
    ideal = b @ a + 0.05 * torch.randn(6, 8, generator=g, dtype=F64)
    correction = correct_module(ideal, a, b, LoraFairSettings())
    assert _cos(ideal, (b + correction) @ a) > _cos(ideal, b @ a) + 0.005
    assert float(correction.norm()) < float(b.norm())  # a residual, not a new B
    again = correct_module(ideal, a, b, LoraFairSettings())
    assert torch.equal(correction, again)  # deterministic


def test_the_ideal_update_is_the_weighted_sum_of_client_products_and_shared_a_needs_no_correction() -> None:
    old = {
        A: torch.randn(2, 3, dtype=F64),
        B: torch.zeros(4, 2, dtype=F64),
        "head": torch.zeros(2, dtype=F64),
    }
    g = torch.Generator().manual_seed(1)
    updates = [
        ClientUpdate(c, {B: torch.randn(4, 2, generator=g, dtype=F64), A: torch.zeros(2, 3, dtype=F64)}, n)
        for c, n in ((0, 10), (1, 30))
    ]
    averaged = aggregate_per_tensor(old, updates)
    new, cosines = lora_fair(old, averaged, updates, [10.0, 30.0], LoraFairSettings())
    # every client kept A: sum_k p_k B_k A = (mean B) A exactly, so there is nothing to correct
    torch.testing.assert_close(new[B], averaged[B])
    assert cosines["cosine_before"] == pytest.approx(1.0)
    # with A trained too, the products no longer factor and B moves towards the ideal update
    updates[1].deltas[A] = torch.randn(2, 3, generator=g, dtype=F64)
    averaged = aggregate_per_tensor(old, updates)
    new, cosines = lora_fair(old, averaged, updates, [10.0, 30.0], LoraFairSettings())
    assert cosines["cosine_after"] >= cosines["cosine_before"]
    torch.testing.assert_close(new[A], averaged[A])  # A is the plain average (continuity of initialisation)


def test_a_layer_set_method_runs_with_lora_fair_and_reproduces(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    over = tiny_overrides("method=fedhello", "federation.aggregation=lora_fair", "federation.rounds=2")
    first = run_experiment(load_config(None, over), tmp_path / "a")
    second = run_experiment(load_config(None, over), tmp_path / "b")
    run_experiment(
        load_config(None, tiny_overrides("method=fedhello", "federation.rounds=2")), tmp_path / "c"
    )
    assert first["final_test_accuracy"] == second["final_test_accuracy"]

    def adapters(run: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        (last,) = sorted((tmp_path / run / "checkpoint").glob("adapters-round*.safetensors"))[-1:]
        return load_file(str(last))

    fair, mean = adapters("a"), adapters("c")
    assert any(not torch.equal(fair[k], mean[k]) for k in fair if "lora_B" in k)  # B was corrected
    assert all(torch.equal(fair[k], adapters("b")[k]) for k in fair)
    rounds = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all(c["accepted"] for r in rounds for c in r["clients"])


def test_rank_methods_refuse_lora_fair_in_one_line(tiny_overrides: Callable[..., list[str]]) -> None:
    from fedhello.engine.experiment import prepare_experiment

    with pytest.raises(UserError, match=r"federation\.aggregation: hetlora"):
        prepare_experiment(
            load_config(None, tiny_overrides("method=hetlora", "federation.aggregation=lora_fair"))
        )
