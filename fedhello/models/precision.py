"""What the frozen base costs in memory: its precision, bitsandbytes quantisation, activation
checkpointing, and the bytes the frozen model really holds (docs/quantization.md).

The base is loaded in `model.dtype`; with `model.quantization` its linears (every `nn.Linear`
except the task head and the LM head) are replaced by bitsandbytes' own quantised layers, the
same layers transformers' `BitsAndBytesConfig` installs, so peft puts its bnb LoRA layers on
them. Quantising after loading (rather than through `from_pretrained`) is what lets a GGUF
checkpoint such as the offline SmolLM2, which transformers refuses to combine with
`quantization_config`, be quantised too. A trained head stays float32, with its input cast, so
that AdamW never updates bf16 weights.

Activation checkpointing wraps each transformer block's `forward` in torch's non-reentrant
`checkpoint` (the mechanism transformers' `activation_checkpointing_enable` uses, applied to
the blocks fedhello found, so that models whose transformers class lacks it, such as MPNet,
get it too). Module hooks stay outside the checkpoint, so a block that runs without autograd
(below the lowest trained one) is not checkpointed at all: only the trained part recomputes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from fedhello.config import ModelConfig
from fedhello.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")
BLOCK_4BIT = 64  # bitsandbytes' 4-bit quantisation block (values per absmax scale)


def resolve_dtype(cfg: ModelConfig, device: str) -> torch.dtype:
    """`model.dtype` as a torch dtype: auto is bfloat16 on a CUDA device that supports it, else
    float32 (CPU matmuls in bf16 are slower than in float32 on most CPUs)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def reduced_precision(cfg: ModelConfig, device: str) -> str | None:
    """What the base is stored in when that is not float32 ("nf4", "bfloat16", "int8 / bfloat16"),
    else None."""
    dtype = resolve_dtype(cfg, device)
    parts: list[str] = [cfg.quantization] if cfg.quantization != "none" else []
    parts += [str(dtype).removeprefix("torch.")] if dtype != torch.float32 else []
    return " / ".join(parts) or None


def full_precision_model(cfg: ModelConfig) -> ModelConfig:
    """The same model in float32 without quantisation."""
    return cfg.model_copy(update={"dtype": "float32", "quantization": "none"})


def bitsandbytes() -> Any:
    """bitsandbytes, imported quietly (its CPU backend logs that an optional kernel package is
    missing), or a one-line error saying how to get it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(
            f"model.quantization: needs bitsandbytes ({e}); `pip install 'bitsandbytes>=0.50'`, or "
            "quantization: none"
        ) from None
    return bnb


def prepare_base(model: nn.Module, cfg: ModelConfig, keep_float32: Sequence[str]) -> nn.Module:
    """Quantise the frozen linears (`model.quantization`) and keep the modules named in
    `keep_float32` (a trained head) in float32 with their inputs cast. The model was loaded in
    its compute dtype; with quantization none and float32 nothing changes."""
    for name in keep_float32:
        module = model.get_submodule(name)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_inputs_to_float32)
    if cfg.quantization != "none":
        skip = set(keep_float32) | _output_embedding_names(model)
        compute_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        count = quantize_linears(model, cfg.quantization, compute_dtype, skip)
        if count == 0:
            raise UserError(f"model.quantization: '{cfg.name}' has no linear layer to quantise")
        # peft chooses its bnb LoRA layers by these flags (what transformers sets when it quantises)
        flag = "is_loaded_in_8bit" if cfg.quantization == "int8" else "is_loaded_in_4bit"
        setattr(model, flag, True)
    return model


def _inputs_to_float32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _output_embedding_names(model: nn.Module) -> set[str]:
    """The LM head (often tied to the input embeddings): never quantised, as transformers does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def quantize_linears(model: nn.Module, mode: str, compute_dtype: torch.dtype, skip: set[str]) -> int:
    """Replace every `nn.Linear` outside `skip` (module names and everything below them) by
    bitsandbytes' quantised layer for `mode`, quantised where the weight is (bitsandbytes quantises
    when a weight moves to a device: on the CPU for a loaded checkpoint); returns how many. A 4-bit
    linear whose input size is not a multiple of the 64-value quantisation block stays as it is
    (bitsandbytes' CPU inference kernel needs whole blocks per row)."""
    bnb = bitsandbytes()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not any(name == s or name.startswith(f"{s}.") for s in skip)
        and (mode == "int8" or module.in_features % BLOCK_4BIT == 0)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device, weight = linear.weight.device, linear.weight.data
        bias = linear.bias is not None
        if mode == "int8":
            new: nn.Module = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=compute_dtype,
                quant_type=mode,
            )
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode)
            # bitsandbytes 0.50 repacks a CPU weight for its inference kernel the first time the
            # layer evaluates, and keeps that layout when training resumes, where the kernel then
            # fails: federated rounds alternate both, so the layer keeps its training layout
            setattr(new, "support_avx512bf16_for_cpu", False)  # noqa: B010
        if bias:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        new = new.to(device)  # bitsandbytes quantises when the weight moves to a device
        setattr(parent, child, new)
    return len(targets)


def frozen_model_bytes(model: nn.Module) -> int:
    """Every parameter and buffer at its stored size, plus bitsandbytes' quantisation state (the
    absmax scales of 4-bit blocks, the row scales of int8 weights), which are neither."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            packed = state.as_dict(packed=True)
            total += sum(v.numel() * v.element_size() for v in packed.values() if isinstance(v, torch.Tensor))
        scales = getattr(p, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


# --- activation checkpointing ------------------------------------------------------------------

RecomputeListener = Callable[[dict[int, int]], None]
_recompute_listener: ContextVar[RecomputeListener | None] = ContextVar("recompute_listener", default=None)


@contextmanager
def recomputed_storages_to(listener: RecomputeListener) -> Iterator[None]:
    """While active, every checkpointed block that runs forward reports, when its recomputation
    in the backward pass ends, the storages (data pointer -> bytes) the recomputation left alive:
    the activations it holds for its own backward. The CPU memory meter counts them."""
    token = _recompute_listener.set(listener)
    try:
        yield
    finally:
        _recompute_listener.reset(token)


class _LiveStorages(TorchDispatchMode):
    """Records the storage of every tensor an op creates; on exit, reports those still alive."""

    def __init__(self, listener: RecomputeListener) -> None:
        super().__init__()
        self.listener = listener
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def __exit__(self, *exc: Any) -> None:
        live = {ptr: n for ptr, (ref, n) in self.storages.items() if not ref.expired()}
        self.storages = {}
        super().__exit__(*exc)
        self.listener(live)


def _contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    listener = _recompute_listener.get()
    return nullcontext(), (_LiveStorages(listener) if listener is not None else nullcontext())


def enable_activation_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Checkpoint each block's forward in training with autograd on (see the module docstring).
    A key/value cache is dropped inside a checkpointed block, as transformers does: the replay
    in the backward pass would otherwise append to it a second time."""
    for block in blocks:
        if getattr(block, "_fedhello_checkpointed", False):
            continue
        block.forward = _checkpointed(block, block.forward)
        setattr(block, "_fedhello_checkpointed", True)  # noqa: B010 (not a declared attribute)


def _checkpointed(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        for key in CACHE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(
            forward, *args, use_reentrant=False, context_fn=_contexts, early_stop=False, **kwargs
        )

    return run
