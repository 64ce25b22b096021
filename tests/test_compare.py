"""`fedhello compare`: a 2x2 grid runs, writes the table (Markdown, CSV) and plots, and a
second call skips the finished cells."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedhello import load_config
from fedhello.cli import main
from fedhello.engine.run_identity import config_hash
from fedhello.errors import UserError
from fedhello.grid import Cell, cell_config, plan_grid


def _compare_args(tmp_path: Path, overrides: list[str]) -> list[str]:
    return [
        *overrides,
        "--methods", "fedhello,fedit", "--settings", "iid,extreme", "--rocs", "6:3:1",
        "--seeds", "1", "--jobs", "2", "--out", str(tmp_path / "grid"), "--work", str(tmp_path / "work"),
    ]  # fmt: skip


def _compare(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    """`fedhello compare` as a command of its own (its cells are `fedhello run` processes)."""
    return subprocess.run(
        [sys.executable, "-m", "fedhello", "compare", *_compare_args(tmp_path, overrides)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_compare_runs_a_grid_writes_the_report_and_skips_finished_cells(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides("federation.rounds=2")
    proc = _compare(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((tmp_path / "grid" / "cells").glob("*.json"))
    assert [p.stem for p in cells] == [
        "extreme_roc6-3-1_fedhello_seed0",
        "extreme_roc6-3-1_fedit_seed0",
        "iid_roc6-3-1_fedhello_seed0",
        "iid_roc6-3-1_fedit_seed0",
    ]
    record = json.loads(cells[0].read_text())
    assert record["summary"]["rounds_completed"] == 2
    assert len(record["rounds"]) == 2 and record["rounds"][0]["clients"]
    assert set(record["rounds"][-1]["metrics"]["test"]) == {"accuracy", "macro_f1", "loss"}
    # the cell's partition is the setting's: 2 classes per client in 'extreme'
    assert record["cell"] == {"setting": "extreme", "roc": "6:3:1", "method": "fedhello", "seed": 0}

    report = (tmp_path / "grid" / "report.md").read_text()
    for text in (
        "iid: final",
        "extreme: last-5",
        "| fedhello (1 seed) |",
        "| fedit (1 seed) |",
        "### fedhello against fedit",
        "download MB total",
        "final macro_f1",
        "| *majority class* |",
        "### Cells that do not beat the majority class",
    ):
        assert text in report
    plots = sorted((tmp_path / "grid" / "report-plots").glob("*.png"))
    assert len(plots) >= 5 and all(p.stat().st_size > 5000 for p in plots)
    rows = list(csv.DictReader((tmp_path / "grid" / "report.csv").open()))
    assert {(r["setting"], r["method"]) for r in rows} == {
        (s, m) for s in ("iid", "extreme") for m in ("fedhello", "fedit")
    }
    fedit_iid = next(r for r in rows if (r["setting"], r["method"]) == ("iid", "fedit"))
    summary = json.loads((tmp_path / "grid" / "cells" / "iid_roc6-3-1_fedit_seed0.json").read_text())[
        "summary"
    ]
    assert float(fedit_iid["final mean"]) == pytest.approx(summary["final_test_accuracy"], abs=1e-4)

    # the second call in this process (the first ran the command itself)
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    capsys.readouterr()
    assert main(["compare", *_compare_args(tmp_path, overrides), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "[1]" not in err and "4 of 4 cells finished" in err  # nothing ran
    assert {p.name: p.stat().st_mtime_ns for p in cells} == before


def test_cells_differ_only_in_their_axes() -> None:
    base = load_config(
        overrides=["groups=[{name: a, share: 1, budget: 0.5}, {name: b, share: 1, budget: 1.0}]"]
    )
    cfg = cell_config(base, Cell("pathological-3", "3:1", "fedra", 7))
    assert (cfg.method, cfg.seed, cfg.partition.scheme, cfg.partition.classes_per_client) == (
        "fedra",
        7,
        "pathological",
        3,
    )
    assert [g.share for g in cfg.groups] == [3.0, 1.0]
    assert config_hash(cfg) == config_hash(cfg.model_copy(update={"threads": 4, "engine": "flower"}))
    assert config_hash(cfg) != config_hash(cell_config(base, Cell("pathological-3", "3:1", "fedra", 8)))
    assert len(plan_grid(base, ["fedit", "fedra"], 2, ["iid", "dirichlet-0.5"], ["1:1", "3:1"])) == 16


@pytest.mark.parametrize(
    ("methods", "settings", "rocs", "message"),
    [
        (["nope"], ["iid"], ["1:1"], "nope"),
        (["fedit"], ["sideways"], ["1:1"], "--settings: unknown setting 'sideways'"),
        (["fedit"], ["iid"], ["1:1:1"], "--rocs: '1:1:1' has 3 parts but the config has 2 groups"),
        (["fedit"], ["iid"], ["1:x"], "--rocs: '1:x' is not a ratio"),
    ],
)
def test_bad_grid_axes_are_named(
    methods: list[str], settings: list[str], rocs: list[str], message: str
) -> None:
    base = load_config(
        overrides=["groups=[{name: a, share: 1, budget: 0.5}, {name: b, share: 1, budget: 1.0}]"]
    )
    with pytest.raises(UserError, match=message):
        plan_grid(base, methods, 1, settings, rocs)


def test_method_variants_merge_their_config_and_keep_the_grid_axes(tmp_path: Path) -> None:
    from fedhello.grid import load_variants

    path = tmp_path / "variants.yaml"
    path.write_text(
        "fedhello-budget:\n  method: fedhello\n  groups:\n"
        "    - {name: low, share: 1, budget: 0.5, memory: 140MiB}\n"
        "    - {name: high, share: 1, budget: 1.0}\n"
    )
    variants = load_variants(path)
    base = load_config(
        None, ["groups=[{name: low, share: 1, budget: 0.5}, {name: high, share: 1, budget: 1.0}]"]
    )
    cells = plan_grid(base, ["fedhello", "fedhello-budget"], 1, ["iid"], ["3:1"], variants)
    plain, budgeted = (cfg for _, cfg in cells)
    assert budgeted.method == "fedhello" and cells[1][0].name == "iid_roc3-1_fedhello-budget_seed0"
    assert (
        budgeted.groups[0].memory == 140 * 2**20 and budgeted.groups[0].share == 3.0
    )  # the ratio still applies
    assert plain.groups[0].memory is None and config_hash(plain) != config_hash(budgeted)
    # a variant's method options join the base's options of that method (here in `fisher:`)
    path.write_text("fedhello-feasible:\n  method: fedhello\n  method_options: {levels_over: feasible}\n")
    with_fisher = base.model_copy(update={"method_options": {"refresh_every": 2}})
    cells = plan_grid(with_fisher, ["fedhello-feasible"], 1, ["iid"], ["1:1"], load_variants(path))
    assert cells[0][1].method_options == {"refresh_every": 2, "levels_over": "feasible"}
    path.write_text("broken:\n  groups: []\n")
    with pytest.raises(UserError, match="broken: needs a 'method'"):
        load_variants(path)
    path.write_text("odd:\n  method: no-such-method\n")
    with pytest.raises(UserError, match="--methods: odd: unknown method 'no-such-method'"):
        plan_grid(base, ["odd"], 1, ["iid"], ["1:1"], load_variants(path))
