"""Instruction tuning of a causal language model (Llama, SmolLM2, ... by hub name, folder or GGUF).

The prompt is the tokenizer's chat template applied to the instruction (and its input), with
`add_generation_prompt=True`, or a plain template where the tokenizer has none:

    ### Instruction:
    {instruction}

    ### Input:            (only when there is an input)
    {input}

    ### Response:

The target is the response followed by the EOS token. The loss counts target positions only,
found *by position* (from the prompt's length and the example's length), never by token id: where
pad and EOS share an id, masking by id would hide the stop token. Logits are computed only where
there is a target, so the vocabulary-sized logits never cover the prompt. Training batches are
right-padded and length-bucketed; generation is greedy, batched and left-padded.

Metrics: `loss` and `perplexity` over response tokens; `exact_match` (after normalising case,
punctuation, articles and whitespace) and `rouge_l` (F-measure, `rouge-score`) of greedy answers
on a fixed, seeded subset of each split (`lm.generate_examples`). The trivial baseline always
gives the split's most frequent answer.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.config import ExperimentConfig
from fedhello.data.instructions import InstructionExamples, load_instruction_examples
from fedhello.data.tokenize import pad_to_length
from fedhello.errors import UserError
from fedhello.models.blocks import unwrap
from fedhello.seeding import Stream, numpy_rng

if TYPE_CHECKING:
    from fedhello.method.fisher import FisherOptions
from fedhello.tasks import register_task
from fedhello.tasks.base import Examples, Task, batches
from fedhello.tasks.metrics import LOWER_IS_BETTER

log = logging.getLogger(__name__)

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
INPUT_BLOCK = "### Input:\n{input}\n\n"


@dataclass(frozen=True)
class EncodedInstructions:
    """Token ids of prompt + response + EOS per example, and where each prompt ends."""

    input_ids: list[np.ndarray]
    prompt_lengths: np.ndarray  # int64: tokens of example i before its first target token
    responses: list[str]  # the reference answers, for exact match and ROUGE-L

    def __len__(self) -> int:
        return len(self.input_ids)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match (normalised) and ROUGE-L F-measure of answers against references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not references:
        return {"exact_match": float("nan"), "rouge_l": float("nan")}
    exact = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": float(np.mean(exact)), "rouge_l": float(np.mean(rouge))}


def target_mask(prompt_lengths: Tensor, lengths: Tensor, width: int) -> Tensor:
    """(batch, width) bool: True at the positions of target tokens (response and EOS), given only
    where each prompt ends and each example ends; padding and prompt positions are False."""
    positions = torch.arange(width)[None, :]
    return (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])


@register_task
class CausalLM(Task):
    name = "causal-lm"
    primary_metric = "exact_match"
    higher_is_better = True
    has_head = False
    trivial_baseline_name = "most_frequent_answer"
    bucket_by_length = True
    export_auto_class = "AutoModelForCausalLM"

    tokenizer: Any = None

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.primary_metric = cfg.lm.primary_metric
        self.higher_is_better = cfg.lm.primary_metric not in LOWER_IS_BETTER

    def load_examples(self) -> InstructionExamples:
        return load_instruction_examples(self.cfg.data, seed=self.cfg.seed)

    def load_model(self, examples: Examples) -> nn.Module:
        from fedhello.models import load_causal_lm

        model, self.tokenizer = load_causal_lm(self.cfg.model, self.cfg.seed, device=self.cfg.device)
        return model

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def save_preprocessing(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    # --- encoding -------------------------------------------------------------------------------

    def prompt(self, instruction: str, context: str) -> str:
        """The prompt text of one example (chat template or the plain template)."""
        tok = self.tokenizer
        if self.cfg.lm.chat_template and getattr(tok, "chat_template", None):
            user = instruction if not context else f"{instruction}\n\n{context}"
            messages = [{"role": "user", "content": user}]
            if self.cfg.lm.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.cfg.lm.system_prompt})
            text: str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text
        block = INPUT_BLOCK.format(input=context) if context else ""
        return PLAIN_TEMPLATE.format(instruction=instruction, input_block=block)

    def _prompt_ids(self, instruction: str, context: str) -> list[int]:
        text = self.prompt(instruction, context)
        templated = self.cfg.lm.chat_template and getattr(self.tokenizer, "chat_template", None)
        # a chat template writes its own special tokens; the plain template gets the tokenizer's (BOS)
        ids: list[int] = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        return ids

    def encode(self, examples: Examples) -> EncodedInstructions:
        assert isinstance(examples, InstructionExamples) and self.tokenizer is not None
        tok = self.tokenizer
        limit = self.cfg.model.max_length
        eos = int(tok.eos_token_id)
        sequences: list[np.ndarray] = []
        prompt_lengths: list[int] = []
        cut = 0
        for instruction, context, response in zip(
            examples.instructions, examples.inputs, examples.responses, strict=True
        ):
            target = [*tok(response, add_special_tokens=False)["input_ids"], eos]
            prompt = self._prompt_ids(instruction, context)
            if len(prompt) + len(target) > limit:
                cut += 1
                prompt, target = self._fit(instruction, context, target, limit)
            sequences.append(np.asarray(prompt + target, dtype=np.int64))
            prompt_lengths.append(len(prompt))
        if cut:
            log.warning(
                "%d of %d examples were longer than model.max_length=%d: their prompts were cut "
                "(the input first, then the instruction), the responses kept",
                cut,
                len(sequences),
                limit,
            )
        return EncodedInstructions(
            sequences, np.asarray(prompt_lengths, dtype=np.int64), list(examples.responses)
        )

    def _fit(
        self, instruction: str, context: str, target: list[int], limit: int
    ) -> tuple[list[int], list[int]]:
        """Shorten the input (then the instruction) token by token until prompt + target fit;
        a response that cannot fit even then keeps its first tokens and its EOS."""
        tok = self.tokenizer
        for field in ("input", "instruction"):
            text = context if field == "input" else instruction
            if not text:
                continue
            ids = tok(text, add_special_tokens=False)["input_ids"]
            low, high = 0, len(ids)  # binary search for the longest prefix that fits
            while low < high:
                mid = (low + high + 1) // 2
                kept = tok.decode(ids[:mid])
                prompt = (
                    self._prompt_ids(instruction, kept) if field == "input" else self._prompt_ids(kept, "")
                )
                if len(prompt) + len(target) <= limit:
                    low = mid
                else:
                    high = mid - 1
            kept = tok.decode(ids[:low])
            if field == "input":
                context = kept
            else:
                instruction = kept
            prompt = self._prompt_ids(instruction, context)
            if len(prompt) + len(target) <= limit:
                return prompt, target
        prompt = self._prompt_ids(instruction, context)
        room = limit - len(prompt)
        if room < 2:
            raise UserError(
                f"model.max_length: {limit} tokens leave no room for a response after the prompt "
                f"template ({len(prompt)} tokens with the instruction cut away); raise it"
            )
        return prompt, target[: room - 1] + target[-1:]

    def lengths(self, data: EncodedInstructions) -> np.ndarray:
        return np.array([len(ids) for ids in data.input_ids], dtype=np.int64)

    def collate(
        self,
        data: EncodedInstructions,
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Right-padded ids, attention mask, and where the targets are (by position)."""
        rows = np.asarray(indices, dtype=np.int64)
        seqs = [data.input_ids[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), int(self.tokenizer.pad_token_id), dtype=np.int64)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = s
        lengths = torch.tensor([len(s) for s in seqs])
        prompts = torch.from_numpy(data.prompt_lengths[rows])
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
            "target_mask": target_mask(prompts, lengths, width),
        }

    def worst_case_batch(
        self, data: EncodedInstructions, indices: np.ndarray, batch_size: int
    ) -> dict[str, Tensor]:
        """A full batch of `model.max_length` tokens, every one attended and every one after the
        first a target (the most logits over the vocabulary a batch can need)."""
        batch = super().worst_case_batch(data, indices, batch_size)
        wide = pad_to_length(batch, self.cfg.model.max_length, int(self.tokenizer.pad_token_id))
        targets = torch.ones_like(wide["input_ids"], dtype=torch.bool)
        targets[:, 0] = False
        return {**wide, "target_mask": targets}

    # --- loss -----------------------------------------------------------------------------------

    def _target_log_probs(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """log p(token) at every target position (flattened), and the example each belongs to.

        The decoder runs on the whole batch; the LM head only on the hidden states that predict
        a target (position t-1 predicts token t)."""
        base: Any = unwrap(model)
        hidden = base.get_decoder()(  # no key/value cache: nothing here generates
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        rows, cols = batch["target_mask"].nonzero(as_tuple=True)
        logits = base.get_output_embeddings()(hidden[rows, cols - 1]).float()
        tokens = batch["input_ids"][rows, cols]
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return log_probs, rows

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        log_probs, _ = self._target_log_probs(model, batch)
        return -log_probs.mean()

    def fisher_objective(
        self, model: nn.Module, batch: dict[str, Tensor], options: FisherOptions, uniforms: Tensor
    ) -> Tensor:
        """log p(response | prompt) of each example: the sum over its target tokens."""
        if options.labels != "empirical" or options.objective != "log_likelihood":
            raise UserError(
                "fisher: causal-lm scores the log-likelihood of the data's responses "
                "(fisher.labels=empirical, fisher.objective=log_likelihood)"
            )
        log_probs, rows = self._target_log_probs(model, batch)
        per_example = torch.zeros(batch["input_ids"].shape[0], dtype=log_probs.dtype, device=log_probs.device)
        return per_example.index_add(0, rows, log_probs)

    # --- evaluation -----------------------------------------------------------------------------

    def generation_subset(self, indices: np.ndarray) -> np.ndarray:
        """The fixed, seeded subset of a split that generation is scored on (same every round)."""
        size = self.cfg.lm.generate_examples
        if size >= len(indices):
            return np.sort(indices)
        rng = numpy_rng(self.cfg.seed, Stream.EVALUATION, len(indices))
        return np.sort(rng.choice(indices, size=size, replace=False))

    @torch.inference_mode()
    def generate(
        self,
        model: nn.Module,
        data: EncodedInstructions,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
    ) -> list[str]:
        """Greedy answers to the prompts of `indices` (in that order), batched and left-padded."""
        base: Any = unwrap(model)
        pad = int(self.tokenizer.pad_token_id)
        order = np.argsort([data.prompt_lengths[i] for i in indices], kind="stable")
        answers: list[str] = [""] * len(indices)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            prompts = [data.input_ids[indices[j]][: data.prompt_lengths[indices[j]]] for j in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for k, p in enumerate(prompts):
                ids[k, width - len(p) :] = torch.from_numpy(p)
                mask[k, width - len(p) :] = 1
            out = base.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=self.cfg.lm.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=int(self.tokenizer.eos_token_id),
            )
            for k, j in enumerate(chunk):
                answers[j] = self.tokenizer.decode(out[k, width:], skip_special_tokens=True).strip()
        return answers

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        data: EncodedInstructions,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, float]:
        model.eval()
        nll, tokens = 0.0, 0
        for batch in batches(self, data, indices, batch_size, None):
            batch = {k: v.to(device) for k, v in batch.items()}
            log_probs, _ = self._target_log_probs(model, batch)
            nll -= float(log_probs.sum())
            tokens += int(log_probs.numel())
        loss = nll / max(tokens, 1)
        subset = self.generation_subset(indices)
        answers = self.generate(model, data, subset, batch_size, device)
        scores = answer_scores(answers, [data.responses[i] for i in subset])
        return {**scores, "loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}

    def trivial_baseline(self, examples: Examples, indices: np.ndarray) -> dict[str, float]:
        """Always the split's most frequent answer (for the Wikipedia topics: "People"), scored
        on the same subset as generation."""
        assert isinstance(examples, InstructionExamples)
        references = [examples.responses[i] for i in self.generation_subset(indices)]
        if not references:
            return {}
        values, counts = np.unique(references, return_counts=True)
        answer = str(values[int(np.argmax(counts))])
        return answer_scores([answer] * len(references), references)
