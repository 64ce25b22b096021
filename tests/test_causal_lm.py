"""Instruction tuning on a tiny random Llama: prompts, masking by position, truncation,
generation, Fisher scores, a federated run evaluated before training, and export to peft and
transformers (the real SmolLM2 file in one slow test)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.config import DataConfig
from fedhello.data.instructions import load_instruction_examples
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.errors import UserError
from fedhello.method.fisher import FisherOptions, fisher_diagonal, fisher_diagonal_loop
from fedhello.tasks.causal_lm import EncodedInstructions, normalize_answer

# A small chat template in the usual shape (system, user, then the assistant's turn).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block Llama (hidden 32) with MiniLM's tokenizer, whose pad and EOS share one id."""
    from conftest import minilm_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    tok.pad_token = "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llm_overrides(tiny_llama_dir: Path) -> Callable[..., list[str]]:
    def make(*extra: str) -> list[str]:
        return [
            "task=causal-lm",
            f"model.name={tiny_llama_dir}",
            "model.max_length=64",
            "data.max_examples=150",  # encoding (prompt fitting) is what a prepare costs
            "data.val_size=30",
            "data.test_size=30",
            "fisher.proxy_size=16",
            "partition.num_clients=4",
            "federation.clients_per_round=2",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=4",
            "lm.generate_examples=6",
            "lm.max_new_tokens=4",
            "eval.every=1",
            "eval.batch_size=8",
            "threads=1",
            "quiet=true",
            "lora.r=4",
            *extra,
        ]

    return make


@pytest.fixture(scope="module")
def llm_exp(llm_overrides: Callable[..., list[str]]) -> Experiment:
    """One experiment for the tests that read it (encoding the examples takes a while); those that
    train with it (calibration probes) restore its adapters."""
    return prepare_experiment(load_config(None, llm_overrides()))


def test_prompt_uses_the_chat_template_and_the_target_ends_with_eos(
    llm_exp: Experiment, llm_overrides: Callable[..., list[str]]
) -> None:
    task: Any = llm_exp.task
    tok = task.tokenizer
    prompt = task.prompt("Which topic?", "Some article.")
    assert prompt.startswith("<user> Which topic?") and prompt.endswith("<assistant> ")
    data = llm_exp.data
    i = int(llm_exp.splits["train"][0])
    ids, start = data.input_ids[i], int(data.prompt_lengths[i])
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[start:-1]).strip().lower() == data.responses[i].lower()
    assert llm_exp.adapted.head_params == []  # no head: the LM head and embeddings stay frozen

    plain = prepare_experiment(load_config(None, llm_overrides("lm.chat_template=false")))
    text = plain.task.prompt("Do it.", "")  # type: ignore[attr-defined]
    assert text == "### Instruction:\nDo it.\n\n### Response:\n"
    assert plain.task.prompt("Do it.", "Here.").endswith("### Input:\nHere.\n\n### Response:\n")  # type: ignore[attr-defined]


def test_targets_are_chosen_by_position_not_by_token_id(llm_exp: Experiment) -> None:
    """Pad and EOS share an id here. The EOS after the response counts, prompt and padding never
    do, and rewriting prompt tokens into the pad/EOS id changes nothing about which positions count."""
    task: Any = llm_exp.task
    eos = int(task.tokenizer.eos_token_id)
    assert eos == int(task.tokenizer.pad_token_id)
    data = EncodedInstructions(
        input_ids=[np.array([5, 6, 7, 8, 9, eos]), np.array([5, eos, eos, 8, eos])],
        prompt_lengths=np.array([3, 3]),
        responses=["x", "y"],
    )
    batch = task.collate(data, [0, 1])
    expected = torch.tensor(
        [[False, False, False, True, True, True], [False, False, False, True, True, False]]
    )
    assert torch.equal(batch["target_mask"], expected)
    assert batch["input_ids"][1, 5] == eos and not batch["target_mask"][1, 5]  # padding, same id

    # the loss is the mean negative log-likelihood of exactly those positions
    model = llm_exp.adapted.model
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs = torch.log_softmax(logits.float(), -1)
        nll = [
            -log_probs[b, t - 1, batch["input_ids"][b, t]]
            for b in range(2)
            for t in range(6)
            if expected[b, t]
        ]
        assert float(task.loss(model, batch)) == pytest.approx(float(torch.stack(nll).mean()), abs=1e-5)


def test_truncation_cuts_the_prompt_and_keeps_the_response(
    llm_exp: Experiment, caplog: pytest.LogCaptureFixture
) -> None:
    from fedhello.data.instructions import InstructionExamples

    task: Any = llm_exp.task
    long_input = " ".join(["word"] * 200)
    examples = InstructionExamples(
        ["Summarise this.", "Short one."],
        [long_input, ""],
        ["a fine answer", "ok"],
        np.array([0, 0]),
        ["all"],
    )
    with caplog.at_level(logging.WARNING):
        data = task.encode(examples)
    assert "1 of 2 examples were longer than model.max_length=64" in caplog.text
    ids, start = data.input_ids[0], int(data.prompt_lengths[0])
    assert len(ids) <= 64
    assert task.tokenizer.decode(ids[start:-1]).strip() == "a fine answer"
    prompt = task.tokenizer.decode(ids[:start])
    assert "summarise this." in prompt.lower() and prompt.count("word") < 200


def test_batched_left_padded_generation_equals_one_at_a_time(llm_exp: Experiment) -> None:
    task: Any = llm_exp.task
    rows = llm_exp.splits["val"][:5]
    together = task.generate(llm_exp.adapted.model, llm_exp.data, rows, 5, llm_exp.device)
    alone = [
        task.generate(llm_exp.adapted.model, llm_exp.data, rows[i : i + 1], 1, llm_exp.device)[0]
        for i in range(5)
    ]
    assert together == alone


def test_exact_match_normalises_answers() -> None:
    assert normalize_answer("  The People. ") == normalize_answer("people")
    assert normalize_answer("Arts") != normalize_answer("History")


def test_fisher_scores_of_response_log_likelihood_vectorised_equal_loop(llm_exp: Experiment) -> None:
    proxy = llm_exp.splits["proxy"][:6]
    options = FisherOptions(batch_size=3)
    fast = fisher_diagonal(
        llm_exp.adapted, llm_exp.task, llm_exp.data, proxy, llm_exp.device, options, seed=0
    )
    slow = fisher_diagonal_loop(
        llm_exp.adapted, llm_exp.task, llm_exp.data, proxy, llm_exp.device, options, seed=0
    )
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-10)
    assert sum(float(v.sum()) for v in fast.values()) > 0
    with pytest.raises(UserError, match=r"fisher\.labels=empirical"):
        fisher_diagonal(
            llm_exp.adapted,
            llm_exp.task,
            llm_exp.data,
            proxy,
            llm_exp.device,
            FisherOptions(labels="model"),
            0,
        )


def test_instruction_sources(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        "\n".join(
            json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)})
            for i in range(5)
        )
    )
    examples = load_instruction_examples(DataConfig(source="jsonl", path=str(alpaca)))
    assert examples.instructions[2] == "Add 2 and 1." and examples.responses[2] == "3"
    dolly = tmp_path / "dolly.jsonl"
    rows = [
        {"instruction": "Q1", "context": "C1", "response": "R1", "category": "open_qa"},
        {"instruction": "Q2", "context": "", "response": "R2", "category": "summarization"},
    ]
    dolly.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_instruction_examples(
        DataConfig(source="jsonl", path=str(dolly), domain_column="category")
    )
    assert examples.inputs == ["C1", ""] and examples.domain_names == ["open_qa", "summarization"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "reply": "A"}))
    with pytest.raises(UserError, match=r"set data\.response_column"):
        load_instruction_examples(DataConfig(source="jsonl", path=str(bad)))

    chat = load_instruction_examples(DataConfig(source="chatterbot"))
    assert len(chat) > 500 and len(chat.label_names) >= 15 and chat.domains is not None
    wiki = load_instruction_examples(DataConfig(wiki_questions=["topic", "title"], max_examples=40))
    assert len(wiki) == 40 and {"Which", "Give"} == {i.split()[0] for i in wiki.instructions}


def test_run_evaluates_before_training_and_exports_to_peft_and_transformers(
    llm_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(None, llm_overrides("eval.before_training=true", "federation.rounds=1"))
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["primary_metric"] == "exact_match" and summary["higher_is_better"] is True
    for key in ("before_training_test_exact_match", "final_test_exact_match", "final_test_rouge_l"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["final_test_perplexity"] > 1.0
    assert summary["trivial_baseline"]["name"] == "most_frequent_answer"
    again = run_experiment(cfg, tmp_path / "again")  # one seed, the same numbers

    def records(run: Path) -> list[Any]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["metrics"], [c["train_loss"] for c in r["clients"]]) for r in map(json.loads, lines)]

    assert records(tmp_path / "run") == records(tmp_path / "again")
    assert again["before_training"] == summary["before_training"]

    run = str(tmp_path / "run")
    assert main(["export", run, "--to", str(tmp_path / "adapter"), "--check"]) == 0
    out = capsys.readouterr().out
    assert float(out.rsplit(":", 1)[1]) < 1e-4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # the adapter matters: the base model alone gives other logits than the trained one
    from transformers import AutoModelForCausalLM

    from fedhello.export import load_run, logits_on_test_batch

    loaded = load_run(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()
    gap = (
        (logits_on_test_batch(loaded, base) - logits_on_test_batch(loaded, loaded.exp.adapted.model))
        .abs()
        .max()
    )
    assert float(gap) > 1e-3
    assert main(["export", run, "--to", str(tmp_path / "merged"), "--merge", "--check"]) == 0
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) < 1e-4
    assert (tmp_path / "merged" / "config.json").is_file()

    assert main(["export", run, "--to", str(tmp_path / "adapter")]) == 2  # not empty: nothing lost
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "not a fedhello run directory" in capsys.readouterr().err
    other = tmp_path / "other"  # the same checkpoint under a config with another LoRA rank
    shutil.copytree(tmp_path / "run", other)
    (other / "config.yaml").write_text(
        (other / "config.yaml").read_text().replace("\n  r: 4\n", "\n  r: 8\n")
    )
    assert main(["export", str(other), "--to", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has shape" in err and not (tmp_path / "y").exists()


def test_classifier_export_includes_the_head(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_experiment(load_config(None, tiny_overrides("federation.rounds=1")), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "adapter"), "--check"]) == 0
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) < 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.slow
def test_real_smollm2_trains_and_generates(tmp_path: Path) -> None:
    """The offline SmolLM2-135M-Instruct GGUF (30 blocks) through the task: chat-template prompts,
    a step of top-half training, and greedy answers."""
    from fedhello.engine.client import train_client
    from fedhello.method.base import Assignment

    cfg = load_config(
        None,
        [
            "task=causal-lm",
            "model.name=smollm2",
            "model.max_length=96",
            "data.max_examples=60",
            "data.val_size=10",
            "data.test_size=10",
            "fisher.proxy_size=5",
            "partition.num_clients=2",
            "federation.clients_per_round=2",
            "quiet=true",
        ],
    )
    exp = prepare_experiment(cfg)
    assert exp.num_layers == 30
    task: Any = exp.task
    assert "<|im_start|>assistant" in task.prompt("Which topic?", "An article.")
    result = train_client(
        exp.adapted,
        exp.task,
        exp.data,
        exp.client_indices[0],
        exp.adapted.lora_state(),
        Assignment(0, tuple(range(15, 30))),
        cfg.train.model_copy(update={"local_steps": 1, "batch_size": 2}),
        train_head=False,
        seed=0,
        round_number=1,
        device=exp.device,
    )
    assert np.isfinite(result.train_loss) and all(
        ".layers.1" in k or ".layers.2" in k for k in result.update.deltas
    )
    answers = task.generate(exp.adapted.model, exp.data, exp.splits["test"][:2], 2, exp.device)
    assert all(isinstance(a, str) and a for a in answers)


def test_worst_case_batch_fills_max_length_with_targets_and_calibrates(
    llm_exp: Experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_calibration: None
) -> None:
    from fedhello.engine.calibration import calibrated, measure, worst_case_batch

    monkeypatch.setenv("FEDHELLO_CACHE_DIR", str(tmp_path))
    batch = worst_case_batch(llm_exp)
    width = llm_exp.cfg.model.max_length
    assert batch["input_ids"].shape == (llm_exp.cfg.train.batch_size, width)
    assert batch["attention_mask"].all() and batch["target_mask"][:, 1:].all()
    costs = calibrated(llm_exp)
    m = measure(llm_exp, (1, 2), steps=1)
    assert costs.training_bytes((1, 2)) == pytest.approx(m.training_bytes, rel=0.02)


@pytest.mark.slow
def test_compare_over_a_causal_lm_finishes_and_writes_a_report(
    llm_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grid of instruction-tuning cells: the progress lines and the report use the task's own
    primary metric (exact match), not accuracy. `compare` runs here (test_compare.py runs it as a
    command); each cell is its own `fedhello run` process all the same, the two side by side."""
    code = main(
        [
            "compare", *llm_overrides("federation.rounds=1"),
            "--methods", "fedhello,fedit", "--settings", "iid", "--rocs", "1:1:1", "--seeds", "1",
            "--jobs", "2", "--out", str(tmp_path / "grid"), "--work", str(tmp_path / "work"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "final test exact_match" in err and "2 of 2 cells finished" in err
    report = (tmp_path / "grid" / "report.md").read_text()
    assert "### Exact match, clients 1:1:1" in report and "| fedhello (1 seed) |" in report
    assert "### fedhello against fedit" in report
