"""Foundation models: offline loading, transformer-block discovery and per-block LoRA adapters."""

from fedhello.models.blocks import (
    find_attention_projections,
    find_blocks,
    head_module_names,
    resolve_targets,
    unwrap,
)
from fedhello.models.loading import (
    default_cache_dir,
    load_causal_lm,
    load_classifier,
    load_image_classifier,
    mpnet_parts,
    resolve_model_path,
)
from fedhello.models.lora import AdaptedModel, add_lora

__all__ = [
    "AdaptedModel",
    "add_lora",
    "default_cache_dir",
    "find_attention_projections",
    "find_blocks",
    "head_module_names",
    "load_causal_lm",
    "load_classifier",
    "load_image_classifier",
    "mpnet_parts",
    "resolve_model_path",
    "resolve_targets",
    "unwrap",
]
