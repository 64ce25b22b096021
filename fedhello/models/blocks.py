"""Find the transformer blocks, their attention projections and the classification head.

Module names differ between architectures and between transformers releases (ViT blocks moved
from `vit.encoder.layer.N.attention.attention.query` to `vit.layers.N.attention.q_proj` in
transformers 5), so we look at the loaded model's structure instead of keeping a table of paths.
"""

from __future__ import annotations

from torch import nn

from fedhello.errors import UserError

# Leaf names of the query / value projections, most common first.
QUERY_NAMES = ("query", "q_proj", "q", "query_proj")
VALUE_NAMES = ("value", "v_proj", "v", "value_proj")
# Top-level attributes that hold the task head of *ForSequenceClassification / *ForImageClassification.
HEAD_NAMES = ("classifier", "score", "classification_head", "head")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a peft LoRA layer wrapping one (so discovery also works after add_lora)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _is_attention(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return "attention" in type(module).__name__.lower() or "attention" in leaf or "attn" in leaf


def _has_attention(block: nn.Module) -> bool:
    return any(_is_attention(n, m) for n, m in block.named_modules() if n and not is_linear(m))


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The dotted name of the ModuleList of transformer blocks, and the blocks (index 0 = input side).

    Chosen as the longest ModuleList of identical modules that contain attention, which is the
    encoder/decoder stack in every transformers model we use. Names are relative to `model`
    (so a peft-wrapped model gives `base_model.model....`).
    """
    best_name, best = "", None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or not _has_attention(children[0]):
            continue
        if best is None or len(children) > len(best):
            best_name, best = name, children
    if best is None:
        raise UserError(f"model: cannot find the transformer blocks of {type(unwrap(model)).__name__}")
    return best_name, best


def _attention_linears(block: nn.Module) -> list[str]:
    """Relative names of the linear layers that sit inside an attention submodule of `block`."""
    attention_prefixes = [n + "." for n, m in block.named_modules() if n and _is_attention(n, m)]
    return [
        name
        for name, module in block.named_modules()
        if is_linear(module) and any(name.startswith(p) for p in attention_prefixes)
    ]


def find_attention_projections(block: nn.Module) -> tuple[str, str]:
    """Relative names (inside one block) of the attention query and value projections.

    With several attention modules (e.g. self- and cross-attention) the first one in module
    order is taken, which is the self-attention in transformers models.
    """
    linears = _attention_linears(block)

    def pick(candidates: tuple[str, ...]) -> str | None:
        for leaf in candidates:
            for name in linears:
                if name.rsplit(".", 1)[-1] == leaf:
                    return name
        return None

    query, value = pick(QUERY_NAMES), pick(VALUE_NAMES)
    if query is None or value is None:
        raise UserError(
            f"model: no separate query/value projections found in {type(block).__name__} "
            f"(attention linears: {', '.join(linears) or 'none'}); set lora.target_modules"
        )
    return query, value


def resolve_targets(block: nn.Module, targets: list[str]) -> list[str]:
    """Relative names of the linear layers in `block` that the user's `lora.target_modules` name.

    A target matches a linear whose relative name equals it or ends with "." + it, so both
    "query" and "attention.self.query" work. Every target must match something.
    """
    linears = [n for n, m in block.named_modules() if n and is_linear(m)]
    found: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            raise UserError(
                f"lora.target_modules: '{target}' matches no linear layer in {type(block).__name__}"
            )
        found.extend(h for h in hits if h not in found)
    return found


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level names (on the unwrapped transformers model) of the classification head modules.

    These are the modules created for the task (e.g. BERT/ViT `classifier`, Llama `score`); the
    pretrained pooler is not part of the head.
    """
    base = unwrap(model)
    names = [
        n
        for n in HEAD_NAMES
        if isinstance(getattr(base, n, None), nn.Module) and any(True for _ in getattr(base, n).parameters())
    ]
    if not names:
        raise UserError(
            f"model: cannot find a classification head ({', '.join(HEAD_NAMES)}) on {type(base).__name__}"
        )
    return names
