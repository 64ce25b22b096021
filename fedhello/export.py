"""`fedhello export RUN --to DIR`: the run's global adapter in a format other tools load.

- Default: peft's own adapter format (`adapter_config.json` + `adapter_model.safetensors`), so
  `PeftModel.from_pretrained(base, DIR)` loads it; a classifier's head goes with it (as peft's
  `modules_to_save`). Rank-heterogeneous methods keep a full-rank global adapter, exported as is.
- `--merge`: the adapter merged into the base weights, saved with `save_pretrained` (plus the
  tokenizer or image processor), so `AutoModelFor...from_pretrained(DIR)` and tools built on it
  (e.g. lm-eval's HF backend) load it without fedhello or peft.
- A model built with random weights (`model.architecture`) has no checkpoint to be a base:
  its base model is saved next to the adapter (`DIR/base_model`).
- A method that changes the base weights (FLoRA merges its updates into them every round) has
  no adapter to export: its export is always the merged model, and says so.
- A run on a quantised or bf16 base (docs/quantization.md) exports an ordinary adapter of the
  float32 base (the checkpoint's adapter loaded onto the full-precision model); `--merge` merges
  it into the float32 base, as peft recommends for QLoRA adapters, not into the quantised one.
- `--check`: reload what was written with plain peft / transformers and compare its logits with
  fedhello's own on a batch of the run's test split (prints the largest absolute difference; for
  a quantised or bf16 run both against the model it trained and the full-precision base with the
  adapter).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from fedhello.config import load_config
from fedhello.engine.checkpoint import load_checkpoint
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.engine.loop import holds_run
from fedhello.errors import UserError
from fedhello.models.blocks import unwrap
from fedhello.models.loading import checkpoint_location, quiet_transformers, resolve_model_path
from fedhello.models.precision import full_precision_model, reduced_precision

BASE_MODEL_DIR = "base_model"


@dataclass
class LoadedRun:
    """A run's experiment (config, task, data, model) with the checkpoint's global adapter loaded."""

    exp: Experiment
    rounds: int

    @property
    def test(self) -> np.ndarray:
        return self.exp.splits["test"]


def load_run(run_dir: Path, *, full_precision: bool = False) -> LoadedRun:
    """Rebuild a run's experiment from its config.yaml and load the checkpoint's global adapter;
    `full_precision`: on the float32, unquantised base, whatever the run trained on (the adapter
    of a quantised or bf16 run is an ordinary adapter of the full-precision base)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run_dir}: not a fedhello run directory (no config.yaml)")
    cfg = load_config(config)
    if full_precision:
        cfg = cfg.model_copy(update={"model": full_precision_model(cfg.model)})
    if not holds_run(run_dir):
        raise UserError(f"{run_dir}: no checkpoint yet (the run has not finished a round)")
    ckpt = load_checkpoint(run_dir / "checkpoint")
    exp = prepare_experiment(cfg)
    lm = exp.adapted
    expected = set(lm.lora_state(with_base=exp.method.changes_base))
    if set(ckpt.global_state) != expected:
        raise UserError(
            f"{run_dir}: the checkpoint's adapters do not fit {cfg.model.name} "
            f"({len(ckpt.global_state)} tensors saved, {len(expected)} expected)"
        )
    lm.load_lora_state(ckpt.global_state)  # shapes checked: a one-line error on a mismatch
    lm.model.eval()
    return LoadedRun(exp, ckpt.round)


def export_adapter(run: LoadedRun, out: Path) -> None:
    """peft's adapter files; a classifier's head as `modules_to_save`."""
    lm = run.exp.adapted
    peft_model: Any = lm.model
    peft_config = peft_model.peft_config["default"]
    config = peft_config.to_dict()
    heads = sorted({name.split(".")[2] for name in lm.head_params})  # base_model.model.<head>.weight
    base_path = resolve_model_path(run.exp.cfg.model.name) if run.exp.task.pretrained else BASE_MODEL_DIR
    config.update(
        {"base_model_name_or_path": base_path, "inference_mode": True, "modules_to_save": heads or None}
    )
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    # peft saves a parameter without its adapter name ("lora_A.default.weight" -> "lora_A.weight")
    tensors = {k.replace(".default.", "."): v.detach().cpu().contiguous() for k, v in lm.lora_state().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def _peft_model(run: LoadedRun) -> peft.PeftModel:
    model = run.exp.adapted.model
    assert isinstance(model, peft.PeftModel)  # add_lora always wraps the base model
    return model


def export_run(run: LoadedRun, out: Path, *, merge: bool = False) -> None:
    """Write the run's global adapter (or, with `merge`, the merged model) to `out`.
    Merging changes `run.exp.adapted.model` in place (peft's merge_and_unload)."""
    with quiet_transformers():
        if merge:
            model = _peft_model(run).merge_and_unload()
            _forget_gguf(model)
            model.save_pretrained(out)
        else:
            if not run.exp.task.pretrained:
                base = copy.deepcopy(_peft_model(run)).unload()
                base.save_pretrained(out / BASE_MODEL_DIR)
            export_adapter(run, out)
        run.exp.task.save_preprocessing(out)


def _forget_gguf(model: Any) -> None:
    """A model loaded from a GGUF file holds dequantised float weights but still carries the GGUF
    "quantizer", which save_pretrained refuses to serialise; the merged weights are plain floats."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        raise UserError("export --merge: the model holds quantised weights that cannot be saved merged")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_export(run: LoadedRun, out: Path, merged: bool) -> nn.Module:
    """What `out` holds, loaded with plain transformers (and peft for an adapter)."""
    import peft
    import transformers

    auto = getattr(transformers, run.exp.task.export_auto_class)
    with quiet_transformers():
        if merged:
            merged_model: nn.Module = auto.from_pretrained(out, dtype=torch.float32)
            return merged_model.eval()
        path, kwargs = (
            checkpoint_location(run.exp.cfg.model.name)
            if run.exp.task.pretrained
            else (str(out / BASE_MODEL_DIR), {})
        )
        if run.exp.task.has_head:
            base_model: Any = unwrap(run.exp.adapted.model)
            # a new head of the run's size; the adapter's modules_to_save then restores the trained one
            kwargs["num_labels"] = base_model.config.num_labels
            kwargs["ignore_mismatched_sizes"] = True
        base = auto.from_pretrained(path, dtype=torch.float32, **kwargs)
        with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            adapted: nn.Module = peft.PeftModel.from_pretrained(base, out)
        return adapted.eval()


def logits_on_test_batch(run: LoadedRun, model: nn.Module, examples: int = 8) -> Tensor:
    """A model's logits on the first examples of the run's test split."""
    batch = run.exp.task.collate(run.exp.data, run.test[:examples])
    with torch.inference_mode():
        logits: Tensor = model(**run.exp.task.model_inputs(batch)).logits
        return logits.float()


def cmd_export(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run), Path(args.to)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to {out}: exists and is not an empty folder; choose another")
    run = load_run(run_dir)
    model_cfg = run.exp.cfg.model
    reduced = reduced_precision(model_cfg, run.exp.cfg.device)
    # What is written is always for the full-precision base: a quantised run's adapter is loaded
    # onto the float32 base (and merged there with --merge, peft's way for QLoRA adapters).
    full = load_run(run_dir, full_precision=True) if reduced is not None else run
    references = {}
    if args.check:
        references[f"fedhello's model ({reduced} base)" if reduced else "fedhello's model"] = (
            logits_on_test_batch(run, run.exp.adapted.model)
        )
        if reduced is not None:
            references["the full-precision base with the adapter"] = logits_on_test_batch(
                full, full.exp.adapted.model
            )
    merge = args.merge or run.exp.method.changes_base
    if merge and not args.merge:
        print(
            f"{run.exp.method.name} changes the base weights, which no adapter can carry: "
            "writing the merged model"
        )
    export_run(full, out, merge=merge)
    kind = "merged model" if merge else "peft adapter"
    if reduced is not None:
        kind += f" for the float32 base; the run trained on the base in {reduced}"
    print(f"exported the global model of round {run.rounds} of {run_dir} to {out} ({kind})")
    if references:
        exported = logits_on_test_batch(full, load_export(full, out, merge))
        for name, reference in references.items():
            diff = (exported - reference).abs().max()
            print(f"check: max |logit difference| from {name} on 8 test examples: {float(diff):.3g}")
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a run's global adapter in peft's format (or, --merge, a merged model)"
    )
    export.add_argument("run", metavar="RUN", help="the run directory (its config.yaml and checkpoint/)")
    export.add_argument("--to", required=True, metavar="DIR", help="an empty or new folder")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    export.add_argument(
        "--check",
        action="store_true",
        help="reload the export with plain peft/transformers and compare logits",
    )
    export.set_defaults(func=cmd_export)
