"""Instruction data: (instruction, optional input, response) triples with a category per example.

Sources (`data.source` with `task: causal-lm`):
- `jsonl`, `csv`, `hf`: columns named by `data.instruction_column`, `data.input_column` and
  `data.response_column`; left unset, Alpaca's (instruction / input / output) and Dolly's
  (instruction / context / response) names are found without mapping. The category (used to
  stratify splits and, as a domain, for `partition.scheme=domain`) is `data.domain_column`
  (Dolly: `category`), else one category for all.
- `chatterbot`: the chatterbot corpus (PyPI `chatterbot-corpus`, English): every prompt and its
  first answer, the topic file as category.
- `wiki_vital`: questions about the offline Wikipedia summaries whose answers can be scored
  exactly (`data.wiki_questions`): "topic" asks for the article's topic among the listed
  topics, "title" for its title; the category is the article's topic.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.config import DataConfig
from fedhello.data.sources import (
    CSV_FIELD_LIMIT,
    chosen_source,
    label_ids,
    load_hf_split,
    read_jsonl,
    subsample,
    wiki_articles,
)
from fedhello.errors import UserError
from fedhello.registry import Registry

INSTRUCTION_NAMES = ("instruction", "prompt", "question")
INPUT_NAMES = ("input", "context")
RESPONSE_NAMES = ("output", "response", "answer")
CHATTERBOT_PACKAGE = "chatterbot_corpus"


@dataclass(frozen=True)
class InstructionExamples:
    """Instructions, their optional inputs and responses; `labels` is a category per example."""

    instructions: list[str]
    inputs: list[str]  # "" where there is none
    responses: list[str]
    labels: np.ndarray
    label_names: list[str]
    domains: np.ndarray | None = None
    domain_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.instructions)

    def select(self, rows: np.ndarray) -> InstructionExamples:
        pick = [int(i) for i in rows]
        return replace(
            self,
            instructions=[self.instructions[i] for i in pick],
            inputs=[self.inputs[i] for i in pick],
            responses=[self.responses[i] for i in pick],
            labels=self.labels[rows],
            domains=None if self.domains is None else self.domains[rows],
        )


InstructionSource = Callable[[DataConfig], InstructionExamples]
INSTRUCTION_SOURCES: Registry[InstructionSource] = Registry("instruction source", "data.source")


def register_instruction_source(name: str) -> Callable[[InstructionSource], InstructionSource]:
    """Make `data.source: name` read instructions (task causal-lm) with the decorated function."""
    return lambda load: INSTRUCTION_SOURCES.register(name, load)


def load_instruction_examples(cfg: DataConfig, seed: int = 0) -> InstructionExamples:
    """The instruction examples `cfg` describes, optionally subsampled (stratified by category)."""
    load = chosen_source(INSTRUCTION_SOURCES, cfg, "task causal-lm reads")
    return subsample(load(cfg), cfg.max_examples, seed)


@register_instruction_source("wiki_vital")
def _wiki_vital_source(cfg: DataConfig) -> InstructionExamples:
    return _wiki_questions(cfg)


@register_instruction_source("chatterbot")
def _chatterbot_source(cfg: DataConfig) -> InstructionExamples:
    return _chatterbot()


def _row_source(cfg: DataConfig) -> InstructionExamples:
    rows, where = _rows(cfg)
    return _from_rows(rows, cfg, where)


for _name in ("jsonl", "csv", "hf"):
    register_instruction_source(_name)(_row_source)


def _rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    assert cfg.path is not None
    if cfg.source == "hf":
        dataset = load_hf_split(cfg.path, cfg.hf_split, cfg.hf_config)
        return [dict(r) for r in dataset], f"data.path {cfg.path}"
    if cfg.source == "jsonl":
        return [record for _, record in read_jsonl(cfg.path)], cfg.path
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{cfg.path}: file not found")
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f)), cfg.path
    except UnicodeDecodeError:
        raise UserError(f"{cfg.path}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{cfg.path}: bad CSV: {e}") from None


def _pick_column(
    columns: Sequence[str], configured: str | None, names: Sequence[str], what: str, where: str
) -> str | None:
    if configured is not None:
        if configured not in columns:
            raise UserError(f"{where}: missing column '{configured}' (columns: {', '.join(columns)})")
        return configured
    found = next((n for n in names if n in columns), None)
    if found is None and what != "input":
        raise UserError(
            f"{where}: no {what} column (looked for {', '.join(names)}; columns: {', '.join(columns)}); "
            f"set data.{what}_column"
        )
    return found


def _from_rows(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> InstructionExamples:
    if not rows:
        raise UserError(f"{where}: no examples")
    columns = list(rows[0])
    instruction = _pick_column(columns, cfg.instruction_column, INSTRUCTION_NAMES, "instruction", where)
    context = _pick_column(columns, cfg.input_column, INPUT_NAMES, "input", where)
    response = _pick_column(columns, cfg.response_column, RESPONSE_NAMES, "response", where)
    assert instruction is not None and response is not None
    if cfg.domain_column is not None and cfg.domain_column not in columns:
        raise UserError(f"{where}: missing column '{cfg.domain_column}' (columns: {', '.join(columns)})")
    instructions, inputs, responses, categories = [], [], [], []
    for number, row in enumerate(rows, start=1):
        text, answer = row.get(instruction), row.get(response)
        if not isinstance(text, str) or not text.strip() or not isinstance(answer, str) or not answer.strip():
            raise UserError(f"{where}: example {number}: empty '{instruction}' or '{response}'")
        instructions.append(text.strip())
        inputs.append(str(row.get(context) or "").strip() if context else "")
        responses.append(answer.strip())
        categories.append(str(row[cfg.domain_column]) if cfg.domain_column else "all")
    labels, names = label_ids(categories)
    domains = labels if cfg.domain_column else None
    return InstructionExamples(
        instructions, inputs, responses, labels, names, domains, names if cfg.domain_column else []
    )


def _chatterbot() -> InstructionExamples:
    import yaml

    spec = importlib.util.find_spec(CHATTERBOT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "data" / "english" if locations else None
    if folder is None or not folder.is_dir():
        raise UserError("data.source chatterbot: run: pip install --no-deps chatterbot-corpus")
    instructions, responses, topics = [], [], []
    for file in sorted(folder.glob("*.yml")):
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in loaded.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            if len(turns) >= 2:
                instructions.append(turns[0])
                responses.append(turns[1])
                topics.append(file.stem)
    labels, names = label_ids(topics)
    return InstructionExamples(
        instructions, [""] * len(instructions), responses, labels, names, labels, names
    )


def _wiki_questions(cfg: DataConfig) -> InstructionExamples:
    """Exactly scorable questions about each English (or `data.language`) Wikipedia summary."""
    language = cfg.language if isinstance(cfg.language, str) else cfg.language[0]
    texts, topics, titles = wiki_articles(language)
    options = sorted(set(topics))
    instructions, inputs, responses, categories = [], [], [], []
    for text, topic, title in zip(texts, topics, titles, strict=True):
        for question in cfg.wiki_questions:
            if question == "topic":
                instructions.append(
                    "Which topic is this Wikipedia article about? Answer with one of: "
                    + ", ".join(options)
                    + "."
                )
                responses.append(topic)
            else:
                instructions.append("Give the title of this Wikipedia article.")
                responses.append(title)
            inputs.append(text)
            categories.append(topic)
    labels, names = label_ids(categories)
    return InstructionExamples(instructions, inputs, responses, labels, names)
