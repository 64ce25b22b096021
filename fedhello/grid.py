"""A comparison grid: methods x data settings x client ratios x seeds, one run per cell.

Each cell runs as its own `fedhello run` process (so cells can run side by side and an
interrupted cell resumes from its checkpoint). A finished cell leaves one small JSON file,
`OUT/cells/<cell>.json`, with the run's summary and its per-round records; that file is
what the report reads and what a benchmark commits. A cell whose file exists and was made
from the same config is skipped, so a grid interrupted at any point is completed later by
running the same command again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedhello.config import ExperimentConfig, config_from_dict, config_to_yaml, load_config
from fedhello.engine.run_identity import config_hash
from fedhello.errors import UserError
from fedhello.io import write_json_atomic
from fedhello.method.registry import check_method, method_entries
from fedhello.records import read_records, records_from_json
from fedhello.reporting.plots import layer_frequency
from fedhello.reporting.summary import Summary

# Named data settings; `pathological-K` and `dirichlet-A` name any other.
SETTINGS: dict[str, dict[str, Any]] = {
    "iid": {"scheme": "iid"},
    "noniid": {"scheme": "pathological", "classes_per_client": 4},
    "extreme": {"scheme": "pathological", "classes_per_client": 2},
}


def setting_partition(name: str) -> dict[str, Any]:
    """The partition section a setting name stands for."""
    if name in SETTINGS:
        return SETTINGS[name]
    kind, _, value = name.partition("-")
    try:
        if kind == "pathological":
            return {"scheme": "pathological", "classes_per_client": int(value)}
        if kind == "dirichlet":
            return {"scheme": "dirichlet", "alpha": float(value)}
    except ValueError:
        pass
    raise UserError(
        f"--settings: unknown setting '{name}' (use iid, noniid, extreme, pathological-K or dirichlet-A)"
    )


def parse_roc(text: str, num_groups: int) -> list[float]:
    """'6:3:1' -> client shares per resource group (low to high, in the config's group order)."""
    try:
        shares = [float(x) for x in text.split(":")]
    except ValueError:
        raise UserError(f"--rocs: '{text}' is not a ratio like 1:1:1") from None
    if len(shares) != num_groups:
        raise UserError(f"--rocs: '{text}' has {len(shares)} parts but the config has {num_groups} groups")
    if any(s <= 0 for s in shares):
        raise UserError(f"--rocs: '{text}': every part must be positive")
    return shares


@dataclass(frozen=True)
class Cell:
    setting: str
    roc: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}_roc{self.roc.replace(':', '-')}_{self.method}_seed{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "roc": self.roc, "method": self.method, "seed": self.seed}


Variants = dict[str, dict[str, Any]]
"""A grid's method variants: name -> {method: a registered method, and config sections to merge},
e.g. {"fedhello-budget": {"method": "fedhello", "groups": [... with memory budgets ...]}}."""


def load_variants(path: str | Path | None) -> Variants:
    """The variants file of `fedhello compare --variants` (YAML), checked."""
    if path is None:
        return {}
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--variants {path}: cannot read ({e.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise UserError(f"--variants {path}: expected a mapping of variant name -> settings")
    for name, spec in tree.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise UserError(f"--variants {path}: {name}: needs a 'method' naming a registered method")
    return tree


def cell_config(base: ExperimentConfig, cell: Cell, variants: Variants | None = None) -> ExperimentConfig:
    """The base config with the cell's method (or variant), seed, partition and client shares.

    The base's method options go to every cell whose method reads them: written in their
    section (`fisher:`, `hetlora:`) where the base's method has one, else only to cells of the
    base's own method."""
    tree = base.model_dump(mode="json")
    variant = (variants or {}).get(cell.method)
    method = variant["method"] if variant is not None else cell.method
    options = tree.pop("method_options")
    section = method_entries()[base.method].legacy_section
    if section is not None:
        tree[section] = options
    elif method == base.method:
        tree["method_options"] = options
    if variant is not None:
        extra = {k: v for k, v in variant.items() if k != "method"}
        own = method_entries()[method].legacy_section
        if "method_options" in extra and own is not None and own in tree:
            extra[own] = extra.pop("method_options")  # where the base's options of this method are
        tree = _merge(tree, extra)
    tree["method"] = method
    tree["seed"] = cell.seed
    tree["quiet"] = True
    tree["partition"] = {**tree["partition"], **setting_partition(cell.setting)}
    for group, share in zip(tree["groups"], parse_roc(cell.roc, len(tree["groups"])), strict=True):
        group["share"] = share
    return config_from_dict(tree, f"cell {cell.name}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# what a committed cell keeps of each round: metrics, costs, the layer probabilities and the
# method's extras (Fisher scores and levels), not the clients' timings in detail
CELL_ROUND_FIELDS = {
    "schema",
    "round",
    "metrics",
    "primary_metric",
    "bytes_up",
    "bytes_down",
    "train_seconds",
    "clients",
    "idle",
    "probabilities",
    "extras",
}
CELL_CLIENT_FIELDS = {
    "client",
    "group",
    "layers",
    "rank",
    "steps",
    "seconds",
    "peak_memory_bytes",
    "bytes_up",
    "bytes_down",
    "over_budget",
}


def cell_record(cell: Cell, cfg: ExperimentConfig, run_dir: Path, commit: str) -> dict[str, Any]:
    """The small, committed result of one cell: summary plus compact per-round records."""
    summary = Summary.read(run_dir / "summary.json")
    records = read_records(run_dir / "metrics.jsonl")
    groups = list(summary.groups)
    rounds = []
    for r in records:
        entry = {k: v for k, v in r.to_json().items() if k in CELL_ROUND_FIELDS}
        entry["clients"] = [{k: v for k, v in c.items() if k in CELL_CLIENT_FIELDS} for c in entry["clients"]]
        rounds.append(entry)
    freq = layer_frequency(records, groups, summary.num_layers)
    return {
        "cell": cell.as_dict(),
        "config_hash": config_hash(cfg),
        "commit": commit,
        "model": cfg.model.name,
        "summary": summary.to_json(),
        "layer_frequency": {
            g: [round(float(x), 4) for x in row] for g, row in zip(groups, freq, strict=True)
        },
        "rounds": rounds,
    }


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell of a grid, with its summary and rounds read as typed records (any
    schema version)."""
    cells = []
    for p in sorted((out / "cells").glob("*.json")):
        try:
            cell = json.loads(p.read_text())
            cell["rounds"] = records_from_json(cell["rounds"], str(p))
            cell["summary"] = Summary.from_json(cell["summary"], str(p))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p}: not a grid cell ({e.__class__.__name__}: {e})") from None
        cells.append(cell)
    return cells


def plan_grid(
    base: ExperimentConfig,
    methods: Sequence[str],
    seeds: int,
    settings: Sequence[str],
    rocs: Sequence[str],
    variants: Variants | None = None,
) -> list[tuple[Cell, ExperimentConfig]]:
    """Every cell with its config; names are checked before anything runs."""
    variants = variants or {}
    for m in methods:
        try:
            check_method(variants[m]["method"] if m in variants else m)
        except ValueError as e:
            raise UserError(f"--methods: {m}: {e}") from None
    if seeds < 1:
        raise UserError("--seeds: must be at least 1")
    cells = []
    for setting in settings:
        for roc in rocs:
            for method in methods:
                for i in range(seeds):
                    cell = Cell(setting, roc, method, base.seed + i)
                    cells.append((cell, cell_config(base, cell, variants)))
    return cells


def write_grid_meta(
    out: Path,
    base: ExperimentConfig,
    *,
    command: str,
    methods: Sequence[str],
    seeds: int,
    settings: Sequence[str],
    rocs: Sequence[str],
    variants: Variants | None = None,
) -> None:
    """What the grid is (the report quotes it): the command, the base config, the axes and the
    method variants."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "methods": list(methods),
        "seeds": seeds,
        "settings": list(settings),
        "rocs": list(rocs),
        "variants": variants or {},
        "base_config": base.model_dump(mode="json"),
    }
    write_json_atomic(out / "grid.json", meta)


def is_finished(out: Path, cell: Cell, cfg: ExperimentConfig) -> bool:
    path = out / "cells" / f"{cell.name}.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("config_hash") == config_hash(cfg))


def run_cell(
    cell: Cell, cfg: ExperimentConfig, out: Path, work: Path, threads: int, commit: str
) -> dict[str, Any]:
    """Run one cell in its own process (resuming its checkpoint if a previous attempt was cut off)."""
    run_dir = work / cell.name
    cfg = cfg.model_copy(update={"threads": threads})
    ckpt = run_dir / "checkpoint" / "state.json"
    args: list[str] = []
    if ckpt.is_file():
        if config_hash(load_config(run_dir / "config.yaml")) == config_hash(cfg):
            args = ["--resume", "--out", str(run_dir)]
        else:  # an attempt with another config: start over
            shutil.rmtree(run_dir, ignore_errors=True)
    if not args:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir.parent / f"{cell.name}.yaml"
        cfg_path.write_text(config_to_yaml(cfg))
        args = [str(cfg_path), "--out", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedhello", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"cell {cell.name} failed (exit {proc.returncode}): {last}")
    record = cell_record(cell, cfg, run_dir, commit)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cells" / f"{cell.name}.json", record)
    return record


def run_grid(
    cells: Sequence[tuple[Cell, ExperimentConfig]],
    out: Path,
    work: Path,
    *,
    jobs: int = 1,
    on_done: Callable[[Cell, dict[str, Any] | Exception], None] | None = None,
) -> list[str]:
    """Run the unfinished cells, `jobs` at a time, each with cores // jobs threads.
    Returns the names of cells that failed (the others are written even if some fail)."""
    todo = [(c, cfg) for c, cfg in cells if not is_finished(out, c, cfg)]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    commit = git_commit()
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_cell, c, cfg, out, work, threads, commit): c for c, cfg in todo}
        for fut in as_completed(futures):
            c = futures[fut]
            try:
                result: dict[str, Any] | Exception = fut.result()
            except RuntimeError as e:
                result = e
                failed.append(c.name)
            if on_done is not None:
                on_done(c, result)
    return failed
