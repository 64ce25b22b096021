"""Extending fedhello through its public registration: a new task and a new method, each defined
here (not in the package) and run end to end; typed records read older files; TensorBoard."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import Tensor, nn

from fedhello import load_config, run_experiment
from fedhello.config import StrictModel
from fedhello.data import TextExamples, load_examples, pad_batch
from fedhello.errors import UserError
from fedhello.method.base import Assignment, Method, RoundInputs, RoundPlan
from fedhello.method.fisher import FisherOptions
from fedhello.method.registry import register_method
from fedhello.records import RoundExtra, RoundRecord, read_records
from fedhello.tasks import Examples, Task, batches, register_task

REPO = Path(__file__).resolve().parents[1]


# -- a toy task: predict a text's (scaled) length; lower mean squared error is better --------
@register_task
class TextLength(Task):
    name = "toy-text-length"
    primary_metric = "mse"
    higher_is_better = False
    has_head = True
    trivial_baseline_name = "predict_mean"

    def load_examples(self) -> TextExamples:
        return load_examples(self.cfg.data, seed=self.cfg.seed)

    def load_model(self, examples: Examples) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return AutoModelForSequenceClassification.from_pretrained(
                self.cfg.model.name, num_labels=1, ignore_mismatched_sizes=True
            )

    def encode(self, examples: Examples) -> dict[str, Any]:
        assert isinstance(examples, TextExamples)
        ids = self.tokenizer(examples.texts, truncation=True, max_length=self.cfg.model.max_length)[
            "input_ids"
        ]
        return {"ids": [np.asarray(x) for x in ids], "target": self._targets(examples)}

    @staticmethod
    def _targets(examples: TextExamples) -> np.ndarray:
        return np.array([min(len(t), 2000) / 1000.0 for t in examples.texts], dtype=np.float32)

    def lengths(self, data: dict[str, Any]) -> np.ndarray:
        return np.array([len(x) for x in data["ids"]])

    def collate(
        self,
        data: dict[str, Any],
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        chunk = np.asarray(indices)
        batch = pad_batch([data["ids"][i] for i in chunk], np.zeros(len(chunk)), 0)
        return {
            "input_ids": torch.from_numpy(batch["input_ids"]),
            "attention_mask": torch.from_numpy(batch["attention_mask"]),
            "target": torch.from_numpy(data["target"][chunk]),
        }

    def _predict(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.squeeze(-1).float()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return torch.nn.functional.mse_loss(self._predict(model, batch), batch["target"])

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        data: dict[str, Any],
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, float]:
        model.eval()
        total = 0.0
        for batch in batches(self, data, indices, batch_size, None):
            err = self._predict(model, batch) - batch["target"]
            total += float((err**2).sum())
        mse = total / len(indices)
        return {"mse": mse, "loss": mse}

    def trivial_baseline(self, examples: Examples, indices: np.ndarray) -> dict[str, float]:
        assert isinstance(examples, TextExamples)
        y = self._targets(examples)[indices]
        return {"mse": float(np.mean((y - y.mean()) ** 2))}

    def fisher_objective(
        self, model: nn.Module, batch: dict[str, Tensor], options: FisherOptions, uniforms: Tensor
    ) -> Tensor:
        return -((self._predict(model, batch) - batch["target"]) ** 2)  # Gaussian log-likelihood


# -- a toy method with one option: every client trains the top `layers` LoRA layers -----------
class TopLayersOptions(StrictModel):
    layers: int = Field(1, ge=1, description="How many of the top layers every client trains.")


class TopLayersNote(RoundExtra):
    """The toy method's own record of a round: what share of the layers it trained."""

    kind: ClassVar[str] = "top_layers"
    share: float


class TopLayersOnly(Method):
    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        assert isinstance(self.ctx.options, TopLayersOptions)
        top = tuple(range(self.ctx.num_layers - self.ctx.options.layers, self.ctx.num_layers))
        note = TopLayersNote(share=len(top) / self.ctx.num_layers)
        return RoundPlan(inputs.round_number, {c: Assignment(c, top) for c in inputs.profiles}, extra=note)


register_method(
    "toy-top-layer",
    lambda ctx: TopLayersOnly("toy-top-layer", ctx),
    "trains the top layers only",
    options=TopLayersOptions,
)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_new_method_registered_outside_the_package_runs_a_round(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    summary = run_experiment(
        load_config(None, tiny_overrides("method=toy-top-layer", "federation.rounds=1")), tmp_path / "m"
    )
    (record,) = _metrics(tmp_path / "m")
    assert len(record["clients"]) == 3
    assert all(c["layers"] == [3] and c["accepted"] for c in record["clients"])
    assert summary["method"] == "toy-top-layer" and np.isfinite(summary["final_test_accuracy"])
    assert record["extras"] == {"top_layers": {"seconds": 0.0, "share": 0.25}}  # its declared extra
    assert summary["top_layers_rounds"] == 1


def test_a_new_method_declares_an_option_and_reads_it(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    from fedhello.engine.run_identity import config_hash

    overrides = tiny_overrides("method=toy-top-layer", "federation.rounds=1")
    cfg = load_config(None, [*overrides, "method_options.layers=2"])
    run_experiment(cfg, tmp_path / "m")
    (record,) = _metrics(tmp_path / "m")
    assert all(c["layers"] == [2, 3] for c in record["clients"])
    # the option is part of the run's identity only where it differs from its default
    default = load_config(None, overrides)
    assert config_hash(load_config(None, [*overrides, "method_options.layers=1"])) == config_hash(default)
    assert config_hash(cfg) != config_hash(default)
    with pytest.raises(
        UserError, match=r"method_options\.layers: Input should be greater than or equal to 1"
    ):
        load_config(None, [*overrides, "method_options.layers=0"])
    with pytest.raises(
        UserError, match=r"method_options\.depth: unknown key \(an option of method 'toy-top-layer'\)"
    ):
        load_config(None, [*overrides, "method_options.depth=2"])
    with pytest.raises(UserError, match=r"method_options: method 'fedra' takes no options"):
        load_config(None, [*overrides, "method=fedra", "method_options.layers=2"])


def test_a_new_task_registered_outside_the_package_runs_a_round(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    cfg = load_config(None, tiny_overrides("task=toy-text-length", "method=fedhello", "federation.rounds=1"))
    summary = run_experiment(cfg, tmp_path / "t")
    (record,) = _metrics(tmp_path / "t")
    assert record["primary_metric"] == "mse"
    assert set(record["metrics"]["test"]) == {"mse", "loss"}
    assert summary["primary_metric"] == "mse" and summary["higher_is_better"] is False
    assert summary["final_test_mse"] == record["metrics"]["test"]["mse"] > 0
    assert summary["predict_mean_test_mse"] > 0
    assert summary["beats_trivial_baseline"] == (summary["final_test_mse"] < summary["predict_mean_test_mse"])
    assert "final_test_accuracy" not in summary
    assert (tmp_path / "t" / "mse.png").is_file()


def test_a_task_without_proxy_files_says_so(tiny_overrides: Callable[..., list[str]]) -> None:
    from fedhello.engine.experiment import prepare_experiment

    cfg = load_config(None, tiny_overrides("task=toy-text-length", "fisher.proxy_path=proxy.csv"))
    with pytest.raises(UserError, match=r"data\.proxy_path: task toy-text-length cannot read"):
        prepare_experiment(cfg)


def test_unknown_task_is_one_line_error() -> None:
    with pytest.raises(UserError, match="task: unknown task 'image-segmentation'"):
        load_config(None, ["task=image-segmentation"])


def test_records_of_the_old_schema_read_into_metrics() -> None:
    old = {
        "round": 2,
        "clients": [{"client": 1, "group": "low", "layers": [0, 5], "rank": None, "steps": 8}],
        "val_accuracy": 0.5,
        "test_accuracy": 0.25,
        "val_loss": 1.5,
        "test_loss": 2.0,
        "bytes_up": 10,
    }
    r = RoundRecord.from_json(old)
    assert r.metrics == {"val": {"accuracy": 0.5, "loss": 1.5}, "test": {"accuracy": 0.25, "loss": 2.0}}
    assert r.metric("test") == 0.25 and r.primary_metric == "accuracy"
    assert r.clients[0].layers == [0, 5] and r.bytes_up == 10
    future = r.to_json() | {"schema": 99, "a_field_added_later": [1, 2]}
    assert RoundRecord.from_json(future).metric("val") == 0.5
    refresh = {"round": 3, "scores": [1.0], "levels": [1], "probabilities": [1.0], "seconds": 0.5}
    schema2 = RoundRecord.from_json({"schema": 2, "round": 3, "fisher": refresh})
    assert schema2.extras == {"fisher": refresh} and schema2.extra_seconds == 0.5
    assert schema2.to_json()["schema"] == 3 and "fisher" not in schema2.to_json()  # rewritten as schema 3


def test_broken_metrics_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": "x"}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2: round: "):
        read_records(path)


def test_report_reads_every_committed_cell(tmp_path: Path) -> None:
    """The committed reference cells (written before typed records) still make a report, with the
    majority-class baseline row."""
    from fedhello.grid import load_cells
    from fedhello.reporting.report import GridResults, accuracy_table, extras_table, fraction_table

    source = REPO / "benchmarks" / "results" / "reference"
    cells = load_cells(source)
    assert len(cells) == len(list((source / "cells").glob("*.json"))) > 0
    assert all(c["rounds"] and c["rounds"][-1].metric("test") is not None for c in cells)
    grid = GridResults.load(source)
    table = accuracy_table(grid, grid.ordered("roc")[0])
    assert "| *majority class* |" in table
    assert f"{grid.baseline('iid'):.3f}" in table.splitlines()[-1]
    extras = extras_table(grid)  # the Fisher refreshes of old cells, read generically
    assert extras is not None and "| fedhello | fisher |" in extras and "| fedit |" not in extras
    against = fraction_table(grid, "fedhello", "exclusive")  # exclusive: only the high group trains
    assert "low sat out in exclusive" in against and "(4.0 vs 1.0 clients trained per round)" in against
    assert "nan" not in against


def test_report_marks_the_lowest_perplexity_as_the_best() -> None:
    """Each column's best mean is bold in its own direction: exact match highest, perplexity
    lowest (the committed SmolLM2 cells at equal budgets)."""
    from fedhello.reporting.report import GridResults, accuracy_table

    grid = GridResults.load(REPO / "benchmarks" / "results" / "equal-budgets-smollm2")
    lines = accuracy_table(grid, "1:1:1").splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip().split(" (")[0]: r.strip("|").split("|") for r in lines[2:-1]}
    for column, pick in [("iid: final", max), ("iid: final perplexity", min)]:
        i = columns.index(column)
        means = {m: float(cells[i].strip(" *").split(" ")[0]) for m, cells in rows.items()}
        best = pick(means, key=lambda m: means[m])
        assert rows[best][i].strip().startswith("**"), (column, best)
        assert sum("**" in cells[i] for cells in rows.values()) == 1, column


def test_tensorboard_tracking_matches_metrics_jsonl(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedhello.reporting.tracking import round_scalars

    run_experiment(
        load_config(
            None, tiny_overrides("tracking=tensorboard", "federation.rounds=2", "method=gd-bottleneck")
        ),
        tmp_path / "tb",
    )
    records = read_records(tmp_path / "tb" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/accuracy", "test/macro_f1", "cost/bytes_up", "group/high/peak_memory_bytes"} <= tags
    for record in records:
        expected = round_scalars(record)
        assert expected["test/accuracy"] == record.metric("test")
        for tag, value in expected.items():
            (event,) = [e for e in acc.Scalars(tag) if e.step == record.round]
            assert event.value == pytest.approx(value, rel=1e-6), tag


def test_a_method_outside_the_package_has_its_own_identity() -> None:
    """(Every committed cell keeping its hash: tests/test_run_identity.py.)"""
    from fedhello.engine.run_identity import config_hash
    from fedhello.grid import Cell, cell_config

    base = load_config(REPO / "benchmarks" / "configs" / "reference.yaml")
    assert config_hash(cell_config(base, Cell("iid", "1:1:1", "toy-top-layer", 0))) != config_hash(
        cell_config(
            base.model_copy(update={"task": "toy-text-length"}), Cell("iid", "1:1:1", "toy-top-layer", 0)
        )
    )


def test_a_new_text_source_is_read_and_subsampled() -> None:
    from fedhello.config import DataConfig
    from fedhello.data.sources import register_text_source

    @register_text_source("toy-numbers")
    def numbers(cfg: DataConfig) -> TextExamples:
        labels = np.arange(40) % 2
        return TextExamples([f"number {i}" for i in range(40)], labels, ["even", "odd"])

    examples = load_examples(DataConfig(source="toy-numbers", max_examples=10), seed=0)
    assert len(examples) == 10 and sorted(np.bincount(examples.labels)) == [5, 5]  # stratified
    with pytest.raises(UserError, match=r"data\.source: text tasks read .*toy-numbers.*, not 'toy-words'"):
        load_examples(DataConfig(source="toy-words"))


def test_a_name_is_registered_once() -> None:
    from fedhello.engine.engines import ENGINES, EngineEntry
    from fedhello.tasks import TASKS

    with pytest.raises(ValueError, match="task 'toy-text-length' is already registered"):
        TASKS.register("toy-text-length", Task)
    with pytest.raises(ValueError, match="method 'fedit' is already registered"):
        register_method("fedit", lambda ctx: TopLayersOnly("fedit", ctx))
    with pytest.raises(ValueError, match="engine 'local' is already registered"):
        ENGINES.register("local", EngineEntry("local", "my.module:run", "another local engine"))
    register_task(TextLength)  # the same class again (a module imported twice) is harmless


def test_report_pairs_cells_by_seed_and_names_methods_that_computed_the_same_runs(tmp_path: Path) -> None:
    import shutil

    from fedhello.reporting.report import GridResults, identical_methods, paired_table

    source = REPO / "benchmarks" / "results" / "reference"
    grid = GridResults.load(source)
    table = paired_table(grid, "fedhello")
    assert table is not None
    row = next(line for line in table.splitlines() if line.startswith("| fedit |"))

    def key(c: dict[str, Any]) -> tuple[str, str, int]:
        return (c["cell"]["setting"], c["cell"]["roc"], c["cell"]["seed"])

    fedit = {key(c): c["summary"].score("final") for c in grid.cells if c["cell"]["method"] == "fedit"}
    diffs = [
        c["summary"].score("final") - fedit[key(c)]
        for c in grid.cells
        if c["cell"]["method"] == "fedhello" and key(c) in fedit
    ]
    assert f"| {len(diffs)} | {np.median(diffs):+.3f} |" in row
    assert identical_methods(grid) == []
    # a second method that ran exactly fedit's runs is named, with the reason
    copy = tmp_path / "grid"
    shutil.copytree(source, copy)
    for p in (copy / "cells").glob("*_fedit_seed*.json"):
        cell = json.loads(p.read_text())
        cell["cell"]["method"] = "fedit-again"
        (p.parent / p.name.replace("_fedit_", "_fedit-again_")).write_text(json.dumps(cell))
    same = identical_methods(GridResults.load(copy))
    assert len(same) == 1 and same[0].startswith("- fedit and fedit-again: in all "), same
    assert "the same clients trained the same layers" in same[0]
