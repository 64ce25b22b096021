"""What a run is: the config hash that checkpoints, resumes and comparison grids compare.

A config's identity is a hash of what it computes. Settings that change nothing in the result
are left out: `threads`, `quiet`, `tracking`, and the engine with its settings (both engines
give the same result for one config).

Fields are added to the config over time, and a new field must not change the identity of the
runs and grid cells made before it (a committed cell would look stale and run again). The rule:
a field that was not part of the config at identity version 1 (`V1_FIELDS`, frozen: it never
changes) is left out of the hash while it is at its default. A new field, or a whole new
section, therefore needs nothing: at its default it changes no identity, and set to anything
else it does. A field of version 1 is always part of the hash.

Version 1 kept method options in the `fisher` and `hetlora` sections, and the proxy set in
`fisher`; the identity tree writes them there still (`_legacy_layout`), so that moving them to
`method_options` and `data` changed no identity. Options of other methods are hashed under
`method_options`, each only where it differs from its default.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from fedhello.config import ExperimentConfig
from fedhello.method.registry import legacy_sections, method_entries, parse_method_options

NOT_RESULTS = ("threads", "quiet", "engine", "flower", "tracking")
"""Top-level settings that change how a run goes, not what it computes."""

V1_FIELDS: dict[str, tuple[str, ...]] = {
    "": (
        "data", "device", "engine", "eval", "federation", "fisher", "flower", "groups", "hetlora",
        "lora", "method", "model", "partition", "quiet", "seed", "threads", "tracking", "train",
    ),
    "data": (
        "cache_dir", "hf_split", "label_column", "language", "max_examples", "path", "source",
        "test_size", "text_column", "val_size",
    ),
    "eval": ("batch_size", "every"),
    "federation": ("clients_per_round", "head", "rounds", "weighting"),
    "fisher": (
        "batch_size", "computation", "hold", "labels", "levels", "num_levels", "objective",
        "prior_product", "proxy_path", "proxy_size", "reduction", "refresh_every", "warmup_rounds",
    ),
    "groups.*": ("budget", "name", "rank", "share"),
    "hetlora": ("gamma", "min_rank", "regularization", "self_pruning"),
    "lora": ("alpha", "dropout", "r", "target_modules"),
    "model": ("max_length", "name"),
    "partition": ("alpha", "beta", "classes_per_client", "min_per_share", "num_clients", "scheme"),
    "train": ("batch_size", "freezing", "local_epochs", "local_steps", "lr", "weight_decay"),
}  # fmt: skip
"""The config's fields at identity version 1 (fedhello 0.1, the reference grid), by section
("groups.*": every group). Frozen: a field added later is not listed here, ever."""


def identity_tree(cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a config that identifies what it computes (see the module docstring)."""
    tree = _fields(cfg, "")
    for key in NOT_RESULTS:
        tree.pop(key, None)
    return _legacy_layout(cfg, tree)


def config_hash(cfg: ExperimentConfig) -> str:
    """The identity of a config: 16 hex digits of the SHA-256 of its identity tree."""
    return hashlib.sha256(json.dumps(identity_tree(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _legacy_layout(cfg: ExperimentConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """Method options and the proxy set where version 1 kept them (see the module docstring)."""
    tree.pop("method_options", None)
    tree["train"]["freezing"] = "real"  # version 1's train.freezing: every run freezes for real
    for key in ("proxy_size", "proxy_path"):
        tree["data"].pop(key, None)
    proxy = {"proxy_size": cfg.data.proxy_size, "proxy_path": cfg.data.proxy_path}
    options = parse_method_options(cfg.method, cfg.method_options)
    entry = method_entries()[cfg.method]
    for section, model in legacy_sections().items():
        mine = options if entry.legacy_section == section and options is not None else model()
        tree[section] = _fields(mine, section) | (proxy if section == "fisher" else {})
    if options is not None and entry.legacy_section is None:
        defaults = type(options)().model_dump(mode="json")
        changed = {k: v for k, v in options.model_dump(mode="json").items() if v != defaults.get(k)}
        if changed:
            tree["method_options"] = changed
    return tree


def _fields(model: BaseModel, section: str) -> dict[str, Any]:
    """A model's fields as JSON values: version-1 fields always (sections recursively), later
    fields only where they differ from their defaults."""
    known = V1_FIELDS.get(section, ())
    dumped = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if name not in known:
            if value != info.get_default(call_default_factory=True):
                out[name] = dumped[name]
            continue
        path = f"{section}.{name}" if section else name
        if isinstance(value, BaseModel) and path in V1_FIELDS:
            out[name] = _fields(value, path)
        elif isinstance(value, list) and f"{path}.*" in V1_FIELDS:
            out[name] = [_fields(item, f"{path}.*") for item in value]
        else:
            out[name] = dumped[name]
    return out
