"""Run identity: every committed grid cell keeps the config hash it was stored under, so
`fedhello compare` never reruns a finished cell after a change to the config's fields."""

from __future__ import annotations

import json
from pathlib import Path

from fedhello.config import config_from_dict
from fedhello.engine.run_identity import config_hash
from fedhello.grid import Cell, cell_config

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_every_committed_cell_keeps_its_config_hash() -> None:
    differs, total = [], 0
    for grid in sorted(RESULTS.glob("**/grid.json")):
        meta = json.loads(grid.read_text())
        base = config_from_dict(meta["base_config"])
        for path in sorted((grid.parent / "cells").glob("*.json")):
            stored = json.loads(path.read_text())
            c = stored["cell"]
            cell = Cell(c["setting"], c["roc"], c["method"], c["seed"])
            total += 1
            if config_hash(cell_config(base, cell, meta.get("variants") or {})) != stored["config_hash"]:
                differs.append(path.name)
    assert total >= 200  # the reference grids and the baselines' grid
    assert differs == []


def test_a_config_written_before_freezing_was_removed_keeps_its_hash() -> None:
    plain = config_from_dict({"method": "fedit"})
    old = config_from_dict({"method": "fedit", "train": {"freezing": "real"}})
    assert config_hash(plain) == config_hash(old)
