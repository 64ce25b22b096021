"""Put LoRA adapters on the attention projections of every transformer block.

A "LoRA layer" (docs/method.md) is the set of adapters inside one block; clients train whole LoRA layers.
`AdaptedModel` therefore records, for every block index, the exact parameter names of its adapters.
The mapping is built from module identity (which parameter objects live inside block i), never
from parsing layer numbers out of names: the released code's substring match made "1" also hit
layers 10 and 11 (docs/method.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from fedhello.config import LoraSettings
from fedhello.errors import UserError
from fedhello.models.blocks import (
    find_attention_projections,
    find_blocks,
    head_module_names,
    resolve_targets,
    unwrap,
)


@dataclass
class AdaptedModel:
    """A peft-wrapped model plus the bookkeeping the federated methods need.

    All parameters start frozen (requires_grad=False): the caller decides which LoRA layers and
    whether the head train. Parameter names are those of `model.named_parameters()`, which are
    also the `model.state_dict()` keys.
    """

    model: nn.Module
    blocks: list[nn.Module]
    layer_params: list[list[str]]
    head_params: list[str]
    block_path: str = ""  # relative to the unwrapped transformers model, e.g. "bert.encoder.layer"
    targets: list[str] = field(default_factory=list)
    _params: dict[str, nn.Parameter] = field(init=False, repr=False)
    _exchanged: dict[str, None] = field(init=False, repr=False)  # LoRA then head names, as a set

    def __post_init__(self) -> None:
        self._params = dict(self.model.named_parameters())
        self._exchanged = dict.fromkeys([*self.lora_params, *self.head_params])

    @property
    def num_layers(self) -> int:
        """L, the number of transformer blocks (= LoRA layers)."""
        return len(self.blocks)

    @property
    def lora_params(self) -> list[str]:
        """All LoRA parameter names, block 0 first."""
        return [name for names in self.layer_params for name in names]

    def parameter(self, name: str) -> nn.Parameter:
        """The parameter object behind a LoRA or head name (e.g. to set requires_grad)."""
        return self._params[name]

    @property
    def base_weights(self) -> list[str]:
        """The frozen weight of every adapted linear ("...query.base_layer.weight"), block order:
        what a method that changes the base (FLoRA) merges its updates into. One line when an
        adapted module is not an `nn.Linear` (a Conv1D's transposed weight is not supported)."""
        names = []
        for name_a in self.lora_params:
            if ".lora_A." not in name_a:
                continue
            module = name_a.split(".lora_A.")[0]
            base = self.model.get_submodule(f"{module}.base_layer")
            if type(base) is not nn.Linear:
                raise UserError(
                    f"model: merging into the base needs nn.Linear projections; '{module}' is "
                    f"{type(base).__name__}"
                )
            names.append(base_weight_name(name_a))
        return names

    def lora_state(self, with_base: bool = False) -> dict[str, Tensor]:
        """Detached copies of every LoRA and head tensor: what clients and server exchange (and,
        `with_base`, the base weights of the adapted linears, for a method that changes them)."""
        names = [*self._exchanged, *(self.base_weights if with_base else [])]
        return {name: self._params[name].detach().clone() for name in names}

    def load_lora_state(self, state: Mapping[str, Tensor]) -> None:
        """Copy (a subset of) LoRA/head tensors (and adapted base weights) into the model in place."""
        for name in state:
            if name not in self._exchanged and not _is_base_weight(name, self._params):
                raise UserError(f"LoRA state: unknown parameter '{name}' for this model")
        with torch.no_grad():
            for name, value in state.items():
                param = self._params[name]
                if param.shape != value.shape:
                    raise UserError(
                        f"LoRA state: '{name}' has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(value)

    def trained_names(self, layers: Iterable[int], include_head: bool) -> list[str]:
        """Names of the tensors a client with this layer set trains and uploads (blocks in order)."""
        names = [name for layer in sorted(layers) for name in self.layer_params[layer]]
        return names + (list(self.head_params) if include_head else [])


def base_weight_name(lora_a_name: str) -> str:
    """The frozen base weight that a lora_A tensor adapts (peft's naming)."""
    return lora_a_name.split(".lora_A.")[0] + ".base_layer.weight"


def _is_base_weight(name: str, params: Mapping[str, nn.Parameter]) -> bool:
    return name.endswith(".base_layer.weight") and name in params


def _adapter_param_ids(module: nn.Module) -> set[int]:
    """ids of the adapter parameters in `module`'s LoRA layers (not the frozen base weights)."""
    ids: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            for name, p in sub.named_parameters():
                if not name.startswith("base_layer."):
                    ids.add(id(p))
    return ids


def add_lora(model: nn.Module, cfg: LoraSettings, seed: int, head: bool = True) -> AdaptedModel:
    """Wrap `model` with LoRA on the query/value projections (or cfg.target_modules) of every block.

    `head=False` for models without a task head (causal LMs: the LM head and embeddings stay
    frozen and are never exchanged).

    peft gets the exact full names of the projections to adapt, so nothing outside the blocks
    (and no other block by a partial name match) gets an adapter. No `task_type` is passed:
    peft would otherwise wrap the head in a ModulesToSaveWrapper copy; the original head module
    is kept and reported in `head_params`. LoRA init runs under `torch.manual_seed(seed)`.
    `model` itself is changed in place (peft swaps the targeted linears for LoRA layers).
    """
    if isinstance(model, peft.PeftModel):
        raise UserError("model: add_lora expects a plain transformers model, got a peft model")
    block_path, blocks = find_blocks(model)
    per_block = [
        list(find_attention_projections(block))
        if cfg.target_modules is None
        else resolve_targets(block, cfg.target_modules)
        for block in blocks
    ]
    full_names = [f"{block_path}.{i}.{name}" for i, names in enumerate(per_block) for name in names]
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=full_names,
        bias="none",
        modules_to_save=None,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft still calls a transformers method that transformers 5 deprecated; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, peft_cfg)
    for p in wrapped.parameters():
        p.requires_grad_(False)

    _, wrapped_blocks = find_blocks(wrapped)
    expected = [2 * len(names) for names in per_block]  # lora_A and lora_B per targeted linear
    layer_params, head_params = _adapter_names(wrapped, wrapped_blocks, head, expected)
    return AdaptedModel(
        model=wrapped,
        blocks=wrapped_blocks,
        layer_params=layer_params,
        head_params=head_params,
        block_path=block_path,
        targets=per_block[0] if per_block else [],
    )


def _adapter_names(
    wrapped: nn.Module, wrapped_blocks: Sequence[nn.Module], head: bool, expected: list[int]
) -> tuple[list[list[str]], list[str]]:
    """The adapter parameter names of every block, and the head's parameter names, mapped by
    object identity; a one-line error for an adapter outside the blocks or a block with other
    than `expected[i]` tensors."""
    block_of_id = {pid: i for i, b in enumerate(wrapped_blocks) for pid in _adapter_param_ids(b)}
    head_names = head_module_names(wrapped) if head else []
    head_ids = {id(p) for name in head_names for p in getattr(unwrap(wrapped), name).parameters()}
    layer_params: list[list[str]] = [[] for _ in wrapped_blocks]
    head_params: list[str] = []
    all_adapter_ids = _adapter_param_ids(wrapped)
    for name, p in wrapped.named_parameters():
        if id(p) in block_of_id:
            layer_params[block_of_id[id(p)]].append(name)
        elif id(p) in head_ids:
            head_params.append(name)
        elif id(p) in all_adapter_ids:
            raise UserError(f"model: LoRA adapter '{name}' lies outside the transformer blocks")
    for i, names in enumerate(layer_params):
        if len(names) != expected[i]:
            raise UserError(f"model: block {i} got {len(names)} LoRA tensors, expected {expected[i]}")
    return [sorted(names) for names in layer_params], sorted(head_params)
