"""Command line: `fedhello run`, `compare`, `report`, `allocate`, `partition`, `deploy`.

User errors print one line and exit with status 2; nothing else is printed for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhello.errors import UserError


def _floats_or_ints(text: str, what: str) -> list[int | float]:
    out: list[int | float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                raise UserError(f"{what}: '{part}' is not a number") from None
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from fedhello.api import run_experiment
    from fedhello.config import load_config
    from fedhello.engine.loop import default_run_dir

    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out DIR (the run directory to continue)")
        if args.config is not None or args.overrides:
            raise UserError("--resume continues a run with its saved config; drop the config and overrides")
        cfg = load_config(Path(args.out) / "config.yaml")
    else:
        cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out is not None else default_run_dir(cfg)
    if not cfg.quiet:
        print(f"run directory: {out}", file=sys.stderr)
    try:
        summary = run_experiment(
            cfg, out, resume=args.resume, accept_unverified=args.accept_unverified_checkpoint
        )
    except KeyboardInterrupt:
        print(f"interrupted; completed rounds are saved: fedhello run --resume --out {out}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from fedhello.method.allocation import collective_distribution, inclusion_frequency
    from fedhello.method.base import ClientProfile, MethodContext, RoundInputs
    from fedhello.method.groups import resolve_budget
    from fedhello.method.registry import build_method
    from fedhello.seeding import Stream, numpy_rng

    L = args.num_layers
    if L < 1:
        raise UserError("--num-layers: must be at least 1")
    budgets = [resolve_budget(b, L, "--budgets") for b in _floats_or_ints(args.budgets, "--budgets")]
    shares = _floats_or_ints(args.shares, "--shares") if args.shares else [1.0] * len(budgets)
    if len(shares) != len(budgets):
        raise UserError(f"--shares: {len(shares)} shares for {len(budgets)} budgets")
    if any(s <= 0 for s in shares):
        raise UserError("--shares: every share must be positive")
    if args.strategy in ("gd", "rgd") and args.pattern is None:
        raise UserError(f"--pattern is required for strategy '{args.strategy}'")
    method_name = args.strategy if args.strategy in ("full", "fedra") else f"{args.strategy}-{args.pattern}"
    ctx = MethodContext(num_layers=L, budgets=budgets, shares=[float(s) for s in shares], seed=args.seed)
    method = build_method(method_name, ctx)
    profiles = {g: ClientProfile(budget=n, rank=1) for g, n in enumerate(budgets)}
    plan = method.plan_round(RoundInputs(1, profiles, numpy_rng(args.seed, Stream.ALLOCATION, 1), _no_scores))
    result: dict[str, Any] = {"method": method_name, "num_layers": L, "groups": []}
    probabilities = plan.probabilities
    for g, (n, s) in enumerate(zip(budgets, shares, strict=True)):
        entry: dict[str, Any] = {"group": g, "budget": n, "share": s}
        layers = list(plan.assignments[g].layers)
        if probabilities is None:
            entry["layers"] = layers
        else:
            entry["example_draw"] = layers
            freq = inclusion_frequency(
                np.asarray(probabilities), n, args.draws, numpy_rng(args.seed, Stream.ALLOCATION, g)
            )
            entry["inclusion_frequency"] = [round(float(x), 4) for x in freq]
        result["groups"].append(entry)
    if args.pattern is not None:
        c = collective_distribution(args.pattern, budgets, shares, L)
        result["collective_distribution"] = [round(float(x), 6) for x in c]
        result["collective_counts"] = [round(float(x) * len(budgets), 6) for x in c]
    if probabilities is not None:
        result["probabilities"] = [round(float(x), 6) for x in probabilities]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_allocation_table(result))
    return 0


def _no_scores(options: Any) -> Any:
    raise UserError("fedhello allocate: Fisher-driven methods need a model; use `fedhello run`")


def _allocation_table(result: dict[str, Any]) -> str:
    L = result["num_layers"]
    lines = [f"{result['method']}  (L={L}; layer 0 = input side)"]
    lines.append("group  budget  share  " + " ".join(f"{i:>3d}" for i in range(L)))
    for g in result["groups"]:
        if "layers" in g:
            cells = ["  x" if i in g["layers"] else "  ." for i in range(L)]
        else:
            cells = [f"{x:3.2f}"[1:] if x < 1 else "1.0" for x in g["inclusion_frequency"]]
            cells = [f"{c:>3s}" for c in cells]
        lines.append(f"{g['group']:>5d}  {g['budget']:>6d}  {g['share']:>5g}  " + " ".join(cells))
    if "collective_distribution" in result:
        lines.append(
            "collective distribution: " + " ".join(f"{x:.3f}" for x in result["collective_distribution"])
        )
    if "probabilities" in result:
        lines.append("sampling probabilities:  " + " ".join(f"{x:.3f}" for x in result["probabilities"]))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from fedhello.config import load_config
    from fedhello.engine.calibration import calibrated, check_budgets
    from fedhello.engine.experiment import prepare_experiment
    from fedhello.engine.planning import (
        compare_allowance,
        format_plan,
        measure_plan,
        memory_options,
        plan_budgets,
        without_memory_options,
    )
    from fedhello.method.registry import check_method

    cfg = load_config(args.config, args.overrides)
    methods = _names(args.methods) if args.methods else None
    for name in methods or []:
        try:
            check_method(name)
        except ValueError as e:
            raise UserError(f"--methods: {e}") from None
    exp = prepare_experiment(cfg)
    exp.costs = calibrated(exp, refresh=args.recalibrate)  # without budgets: still what each set costs
    check_budgets(exp)  # one line for budgets nothing fits
    plan = plan_budgets(exp, methods)
    options = memory_options(cfg)
    if options is not None:  # what the same budgets allow on the float32 base without checkpointing
        plain = prepare_experiment(without_memory_options(cfg))
        plain.costs = calibrated(plain, refresh=args.recalibrate)
        plan["memory_options"] = compare_allowance(exp, plain, options)
    measured = measure_plan(exp, plan) if args.measure else None
    if args.json:
        print(json.dumps({**plan, "measured": measured} if measured is not None else plan, indent=2))
    else:
        print(format_plan(plan, measured))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedhello.config import load_config
    from fedhello.data import describe_partition, format_partition_table
    from fedhello.engine.experiment import split_and_partition
    from fedhello.tasks import build_task

    cfg = load_config(args.config, args.overrides)
    task = build_task(cfg)
    examples, _, parts = split_and_partition(cfg, task, task.load_examples())
    desc = describe_partition(
        examples.labels, parts, examples.label_names, examples.domains, examples.domain_names
    )
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        print(format_partition_table(desc, examples.label_names))
    return 0


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    from fedhello.config import load_config
    from fedhello.grid import load_variants, plan_grid, run_grid, write_grid_meta
    from fedhello.reporting.summary import Summary

    base = load_config(args.config, args.overrides)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path("runs") / "compare" / out.name
    methods, settings, rocs = _names(args.methods), _names(args.settings), _names(args.rocs)
    variants = load_variants(args.variants)
    cells = plan_grid(base, methods, args.seeds, settings, rocs, variants)
    command = " ".join(["fedhello", *sys.argv[1:]])
    write_grid_meta(
        out,
        base,
        command=command,
        methods=methods,
        seeds=args.seeds,
        settings=settings,
        rocs=rocs,
        variants=variants,
    )
    total = len(cells)
    done = 0

    def report_cell(cell: Any, result: Any) -> None:
        nonlocal done
        done += 1
        if isinstance(result, Exception):
            print(f"[{done}] {result}", file=sys.stderr)
        else:
            s = Summary.from_json(result["summary"], cell.name)
            final = s.score("final")
            print(
                f"[{done}] {cell.name}: final test {s.primary_metric} "
                f"{'n/a' if final is None else f'{final:.3f}'} ({s.wall_seconds:.0f} s)",
                file=sys.stderr,
            )

    failed = run_grid(cells, out, work, jobs=args.jobs, on_done=report_cell)
    print(f"{total - len(failed)} of {total} cells finished in {out / 'cells'}", file=sys.stderr)
    if not args.no_report:
        from fedhello.reporting.report import write_report

        report = Path(args.report) if args.report else out / "report.md"
        write_report([out], report, command=command)
        print(f"report: {report}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedhello.reporting.report import write_report

    grids = [Path(g) for g in args.grids]
    for g in grids:
        if not (g / "cells").is_dir():
            raise UserError(f"{g}: not a grid directory (no cells/ inside)")
    write_report(
        grids,
        Path(args.to),
        command=args.command_line,
        notes=Path(args.notes) if args.notes else None,
        method=args.method,
        reference=args.reference,
    )
    print(f"report: {args.to}", file=sys.stderr)
    return 0


def _add_run_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello run`: run or resume one experiment."""
    run = sub.add_parser("run", help="run (or resume) a federated fine-tuning experiment")
    run.add_argument("config", nargs="?", help="YAML config file (optional)")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=0.01")
    run.add_argument("--out", help="run directory (default: runs/<method>-seed<seed>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument(
        "--accept-unverified-checkpoint",
        action="store_true",
        help="with --resume: continue from a checkpoint written before checkpoints carried a manifest "
        "(checksums and config hash), which cannot be verified",
    )
    run.set_defaults(func=cmd_run)


def _add_allocate_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello allocate`: the layer sets a strategy gives each group."""
    alloc = sub.add_parser("allocate", help="print the layer sets a strategy gives each group")
    alloc.add_argument(
        "--strategy",
        choices=["full", "gd", "rgd", "fedra"],
        required=True,
        help="fixed sets (full, gd) or per-round draws (rgd, fedra); Fisher methods need a model",
    )
    alloc.add_argument("--pattern", choices=["triangle", "inverted_triangle", "bottleneck", "uniform"])
    alloc.add_argument("--num-layers", type=int, required=True)
    alloc.add_argument("--budgets", required=True, help="per group: layer counts (6,9,12) or fractions")
    alloc.add_argument("--shares", help="client shares per group (default equal), e.g. 6,3,1")
    alloc.add_argument("--seed", type=int, default=0)
    alloc.add_argument("--draws", type=int, default=10000, help="draws for realised inclusion frequencies")
    alloc.add_argument("--json", action="store_true")
    alloc.set_defaults(func=cmd_allocate)


def _add_partition_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello partition`: per-client sizes and classes."""
    part = sub.add_parser("partition", help="print per-client sizes and class histograms")
    part.add_argument("config", nargs="?", help="YAML config file (optional)")
    part.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, e.g. partition.scheme=dirichlet"
    )
    part.add_argument("--json", action="store_true")
    part.set_defaults(func=cmd_partition)


def _add_plan_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello plan`: what device budgets allow."""
    plan = sub.add_parser(
        "plan", help="what each group's memory / time / upload budgets allow, and what each method sends it"
    )
    plan.add_argument("config", nargs="?", help="YAML config file (optional)")
    plan.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    plan.add_argument("--methods", help="comma-separated methods to plan (default: every method)")
    plan.add_argument(
        "--measure",
        action="store_true",
        help="train each planned layer set a few steps: predicted vs measured",
    )
    plan.add_argument(
        "--recalibrate", action="store_true", help="ignore the cached calibration of this machine"
    )
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)


def _add_compare_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello compare`: a comparison grid."""
    comp = sub.add_parser("compare", help="run a grid of methods x data settings x client ratios x seeds")
    comp.add_argument("config", nargs="?", help="YAML config file for every cell (optional)")
    comp.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every cell")
    comp.add_argument("--methods", required=True, help="comma-separated, e.g. fedhello,fedit,fedra")
    comp.add_argument(
        "--variants",
        help="YAML file of method variants usable in --methods: name -> {method: ..., config sections}",
    )
    comp.add_argument("--seeds", type=int, default=1, help="seeds per cell: seed, seed+1, ...")
    comp.add_argument(
        "--settings",
        default="iid",
        help="iid, noniid (4 classes/client), extreme (2), pathological-K, dirichlet-A",
    )
    comp.add_argument("--rocs", default="1:1:1", help="client ratios over the groups, e.g. 1:1:1,6:3:1")
    comp.add_argument("--jobs", type=int, default=1, help="cells run side by side (threads split evenly)")
    comp.add_argument("--out", required=True, help="grid directory: finished cells go to OUT/cells/")
    comp.add_argument("--work", help="where the cells' full runs go (default runs/compare/<OUT name>)")
    comp.add_argument("--report", help="report path (default OUT/report.md)")
    comp.add_argument("--no-report", action="store_true", help="only run the cells")
    comp.set_defaults(func=cmd_compare)


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    """`fedhello report`: the report of finished grids."""
    rep = sub.add_parser("report", help="write the Markdown report (tables, plots) of finished grids")
    rep.add_argument("grids", nargs="+", help="grid directories made by `fedhello compare`")
    rep.add_argument("--to", required=True, help="Markdown file; plots go to a folder beside it")
    rep.add_argument("--notes", help="Markdown file whose text is included as the discussion")
    rep.add_argument("--command-line", default=None, help="the command to quote as having made the grid")
    rep.add_argument("--method", default="fedhello", help="the method compared with every other one")
    rep.add_argument(
        "--reference", default="fedit", help="the method whose costs --method is measured against"
    )
    rep.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedhello", description="Federated LoRA fine-tuning with heterogeneous LoRA allocation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_command(sub)
    _add_allocate_command(sub)
    _add_partition_command(sub)
    _add_plan_command(sub)
    _add_compare_command(sub)
    _add_report_command(sub)

    from fedhello.deploy.cli import add_deploy_commands
    from fedhello.export import add_export_command

    add_deploy_commands(sub)
    add_export_command(sub)
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> None:
    # argparse fills `config` with the first positional; a `key=value` there is an override.
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not Path(cfg).exists():
        args.overrides = [cfg, *args.overrides]
        args.config = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _split_config_and_overrides(args)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"fedhello: error: {e}", file=sys.stderr)
        return 2
