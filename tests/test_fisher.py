"""Fisher layer scores: the vectorised per-example method equals the per-example loop (docs/method.md)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedhello import load_config
from fedhello.config import ExperimentConfig, LoraSettings
from fedhello.data import TokenizedExamples
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.method.fisher import (
    FisherOptions,
    fisher_diagonal,
    fisher_diagonal_loop,
    fisher_layer_scores,
    layer_scores,
)
from fedhello.models import AdaptedModel, add_lora
from fedhello.tasks.classification import fisher_labels
from fedhello.tasks.text_classification import TextClassification

COMBOS = [
    (objective, labels)
    for objective in ("log_likelihood", "true_class_logit")
    for labels in ("empirical", "model")
]


def _randomise_b(lm: AdaptedModel, seed: int = 0) -> None:
    """LoRA init sets B = 0, which makes every A gradient zero; give B small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lm.lora_params:
            if "lora_B" in name:
                p = lm.parameter(name)
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _assert_same_fisher(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = float(b[name].abs().max())
        assert scale > 0, f"{name}: zero Fisher, the comparison would be vacuous"
        err = float((a[name] - b[name]).abs().max())
        assert err <= 1e-5 * scale, f"{name}: max abs difference {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def bert(tiny_overrides: Callable[..., list[str]]) -> Experiment:
    exp = prepare_experiment(load_config(None, tiny_overrides()))
    _randomise_b(exp.adapted)
    return exp


def _proxy(exp: Experiment, n: int = 20) -> np.ndarray:
    return exp.splits["val"][:n]


def _varied_lengths(exp: Experiment, n: int = 20) -> tuple[TokenizedExamples, np.ndarray]:
    """Real texts cut to lengths 6..32 (keeping the final [SEP]), so batches need padding."""
    idx = _proxy(exp, n)
    cut = [
        np.concatenate([exp.data.input_ids[i][: 5 + (7 * j) % 27], exp.data.input_ids[i][-1:]])
        for j, i in enumerate(idx)
    ]
    return TokenizedExamples(cut, exp.data.labels[idx]), np.arange(n)


def test_vectorised_equals_loop_on_tiny_bert(bert: Experiment) -> None:
    lm = bert.adapted
    tokens, idx = _varied_lengths(bert)
    assert len({len(ids) for ids in tokens.input_ids}) > 10, "the proxy examples should need padding"
    results = {}
    for objective, labels in COMBOS:
        opts = FisherOptions(objective=objective, labels=labels, batch_size=6)  # type: ignore[arg-type]
        vec = fisher_diagonal(lm, bert.task, tokens, idx, bert.device, opts, seed=7)
        loop = fisher_diagonal_loop(lm, bert.task, tokens, idx, bert.device, opts, seed=7)
        _assert_same_fisher(vec, loop)
        assert set(vec) == set(lm.lora_params)
        assert not set(vec) & set(lm.head_params)
        for f in vec.values():
            assert bool((f >= 0).all())
        results[objective, labels] = vec
    # The options really change what is computed.
    ll = results["log_likelihood", "empirical"]
    for key in [("true_class_logit", "empirical"), ("log_likelihood", "model")]:
        other = results[key]
        assert any(not torch.allclose(ll[n], other[n]) for n in ll), key


def test_model_labels_are_seeded(bert: Experiment) -> None:
    lm, idx = bert.adapted, _proxy(bert, 12)
    opts = FisherOptions(labels="model")
    a = fisher_diagonal(lm, bert.task, bert.data, idx, bert.device, opts, seed=3)
    b = fisher_diagonal(lm, bert.task, bert.data, idx, bert.device, opts, seed=3)
    c = fisher_diagonal(lm, bert.task, bert.data, idx, bert.device, opts, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], c[n]) for n in a)


def test_label_sampling_follows_the_predictive_distribution() -> None:
    n = 10_000
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(n, 3)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    sampled = fisher_labels(logits, torch.zeros(n, dtype=torch.long), u, "model")
    freq = torch.bincount(sampled, minlength=3).double() / n
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=1e-3)
    data = torch.tensor([2, 0, 1])
    assert torch.equal(fisher_labels(logits[:3], data, u[:3], "empirical"), data)


def test_flags_and_modes_are_restored_and_dropout_is_off(bert: Experiment) -> None:
    lm, idx = bert.adapted, _proxy(bert, 8)
    assert bert.cfg.lora.dropout > 0  # dropout exists, must be inactive
    reference = fisher_diagonal(lm, bert.task, bert.data, idx, bert.device)

    lm.model.train()
    odd = {lm.head_params[0], lm.layer_params[1][0]}
    for name, p in lm.model.named_parameters():
        p.requires_grad_(name in odd)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    modes = {n: m.training for n, m in lm.model.named_modules()}
    for fn in (fisher_diagonal, fisher_diagonal_loop):
        result = fn(lm, bert.task, bert.data, idx, bert.device)
        assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
        assert {n: m.training for n, m in lm.model.named_modules()} == modes
        assert all(p.grad is None for p in lm.model.parameters())
        _assert_same_fisher(result, reference)  # train mode on entry: still eval, no dropout


def test_layer_scores_sum_is_the_trace(bert: Experiment) -> None:
    lm, idx = bert.adapted, _proxy(bert, 8)
    f = fisher_diagonal(lm, bert.task, bert.data, idx, bert.device)
    scores = layer_scores(lm, f, "sum")
    assert scores.shape == (lm.num_layers,)
    hand = [sum(float(f[n].sum()) for n in names) for names in lm.layer_params]
    np.testing.assert_allclose(scores, hand, rtol=1e-12)
    frob = [sum(float(torch.linalg.vector_norm(f[n])) for n in names) for names in lm.layer_params]
    np.testing.assert_allclose(layer_scores(lm, f, "frobenius"), frob, rtol=1e-12)
    for method in ("vectorised", "loop"):
        opts = FisherOptions(reduction="frobenius", computation=method)  # type: ignore[arg-type]
        got = fisher_layer_scores(lm, bert.task, bert.data, idx, bert.device, opts)
        np.testing.assert_allclose(got, frob, rtol=1e-5)


def test_layer_scores_hand_example() -> None:
    lm = SimpleNamespace(layer_params=[["a", "b"], ["c"]])
    f = {
        "a": torch.tensor([[3.0, 4.0]]),  # sum 7, Frobenius 5
        "b": torch.tensor([1.0, 2.0, 2.0]),  # sum 5, Frobenius 3
        "c": torch.tensor([[0.0, 5.0], [12.0, 0.0]]),  # sum 17, Frobenius 13
        "head.weight": torch.tensor([100.0]),  # not a LoRA tensor of any block: ignored
    }
    np.testing.assert_allclose(layer_scores(lm, f, "sum"), [12.0, 17.0])
    np.testing.assert_allclose(layer_scores(lm, f, "frobenius"), [8.0, 13.0])
    with pytest.raises(KeyError):
        layer_scores(SimpleNamespace(layer_params=[["missing"]]), f)
    with pytest.raises(ValueError):
        layer_scores(lm, f, "trace")  # type: ignore[arg-type]


def test_bad_options_and_empty_proxy(bert: Experiment) -> None:
    with pytest.raises(ValueError):
        FisherOptions(objective="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FisherOptions(batch_size=0)
    with pytest.raises(ValueError):
        fisher_diagonal(bert.adapted, bert.task, bert.data, np.array([], dtype=np.int64), bert.device)


def test_vectorised_equals_loop_on_tiny_llama() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    cfg.num_labels = 3
    lm = add_lora(LlamaForSequenceClassification(cfg), LoraSettings(r=4, alpha=8, dropout=0.1), seed=0)
    _randomise_b(lm, seed=1)
    rng = np.random.default_rng(0)
    tokens = TokenizedExamples(
        input_ids=[rng.integers(1, 64, size=int(rng.integers(3, 15))).astype(np.int32) for _ in range(14)],
        labels=rng.integers(0, 3, size=14).astype(np.int64),
    )
    idx = np.arange(14)[::-1].copy()
    task = TextClassification(ExperimentConfig())  # pad id 0, like the model
    device = torch.device("cpu")
    for objective, labels in COMBOS:
        opts = FisherOptions(objective=objective, labels=labels, batch_size=5)  # type: ignore[arg-type]
        vec = fisher_diagonal(lm, task, tokens, idx, device, opts, seed=1)
        loop = fisher_diagonal_loop(lm, task, tokens, idx, device, opts, seed=1)
        _assert_same_fisher(vec, loop)
        assert set(vec) == set(lm.lora_params)


def test_released_quantities_match_a_direct_computation(bert: Experiment) -> None:
    """The compatibility options give the released code's score: per example, the gradient of the
    raw true-class logit; F = mean of squares per tensor; layer score = sum of the per-tensor
    Frobenius norms of F. Recomputed here independently with plain autograd, one example at a time."""
    lm, tokens = bert.adapted, bert.data
    idx = _proxy(bert, 8)
    names = lm.lora_params
    params = [lm.parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    lm.model.eval()
    sq = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in idx:
        ids = torch.as_tensor(tokens.input_ids[i], dtype=torch.long)[None]
        logit = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, int(tokens.labels[i])]
        for acc, g in zip(sq, torch.autograd.grad(logit, params), strict=True):
            acc += g.double() ** 2
    for p in params:
        p.requires_grad_(False)
    fisher = {n: acc / len(idx) for n, acc in zip(names, sq, strict=True)}
    expected = np.array(
        [sum(float(torch.linalg.norm(fisher[n])) for n in layer) for layer in lm.layer_params]
    )

    released = FisherOptions(objective="true_class_logit", reduction="frobenius")
    got = fisher_layer_scores(lm, bert.task, tokens, idx, bert.device, released)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    ours = fisher_layer_scores(lm, bert.task, tokens, idx, bert.device, FisherOptions())
    assert not np.allclose(ours, got)  # the project's default is a different quantity
