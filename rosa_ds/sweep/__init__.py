"""``rosa-ds sweep``: a grid of runs (models x methods x ranks/densities x world sizes x seeds,
any config keys), each checked by config validation and the planner before anything starts,
then run one after another here or submitted as SLURM job arrays; ``rosa-ds sweep report``
turns the results into a table and plots.

    grid.py    the grid file, its expansion into cells and their names
    cells.py   each cell's config, plan and folders; the planned table
    local.py   cells one after another on this machine
    slurm.py   cells as job arrays over the project's sbatch template
    report.py  results table, plots and cost exponents
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rosa_ds.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", "-g", help="the grid YAML (axes of config overrides)")
    p.add_argument("--config", "-c", help="base run config (default: the grid's base:)")
    p.add_argument("overrides", nargs="*", help="dotted overrides every cell gets")
    p.add_argument("--out", "-o", help="sweep folder (default: runs/sweep-<grid name>)")
    p.add_argument("--plan-only", action="store_true", help="print the planned table, run nothing")
    p.add_argument("--slurm", action="store_true", help="submit SLURM job arrays, one per size")
    p.add_argument("--array-limit", type=int, help="array tasks running at once (sbatch %%N)")
    p.add_argument(
        "--gpus-per-node", type=int, default=0, help="with --slurm: GPUs per node (0: CPU nodes)"
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="with --slurm: passed to sbatch, e.g. --sbatch-arg=--partition=gpu (repeatable)",
    )
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU; cells planned above it skip")
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU, for planned time")
    p.add_argument("--bandwidth", type=float, help="GB/s per GPU, to add communication time")
    p.add_argument(
        "--device",
        choices=["gpu", "cpu"],
        help="what the planner plans for (default: gpu, or cpu for local runs without CUDA)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable planned table")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a sweep folder (the --out of rosa-ds sweep)")
    p.add_argument("--out", "-o", help="where to write (default: <folder>/report)")
    p.add_argument("--json", action="store_true", help="print results.json's content")


def _options(args: argparse.Namespace, grid_plan: dict, local: bool) -> dict:
    """The planner's settings: the flags over the grid's ``plan:``. The device planned for is
    where the cells will run: this machine for a local sweep (CPU without CUDA), CPU nodes for
    ``--slurm --gpus-per-node 0``, and otherwise (``--plan-only`` too) GPUs."""
    options = dict(grid_plan)
    for flag, key in [("gpu_memory", "gpu_memory_gib"), ("tflops", "tflops"),
                      ("bandwidth", "bandwidth_gbs"), ("device", "device")]:  # fmt: skip
        if getattr(args, flag) is not None:
            options[key] = getattr(args, flag)
    if "device" not in options:
        if local:
            import torch

            options["device"] = "gpu" if torch.cuda.is_available() else "cpu"
        else:
            options["device"] = "cpu" if args.slurm and args.gpus_per_node <= 0 else "gpu"
    if options["device"] == "gpu":
        options.setdefault("gpu_memory_gib", 80.0)
    return options


def run_sweep(args: argparse.Namespace) -> int:
    from rosa_ds.sweep.cells import format_table, preflight, resolve_cells, write_sweep
    from rosa_ds.sweep.grid import load_grid

    if not args.grid:
        raise UserError("sweep needs --grid FILE (or: rosa-ds sweep report DIR)")
    if args.plan_only and args.slurm:
        raise UserError("--plan-only runs nothing; drop --slurm, or drop --plan-only to submit")
    if args.array_limit is not None and args.array_limit < 1:
        raise UserError(f"--array-limit must be >= 1, got {args.array_limit}")
    grid = load_grid(args.grid)
    out = Path(args.out or f"runs/sweep-{Path(args.grid).stem}").resolve()
    options = _options(args, grid.plan, local=not (args.plan_only or args.slurm))
    planned = resolve_cells(grid.cells(), args.config or grid.base, args.overrides, out, options)
    if args.json:
        print(json.dumps([p.row() | {"done": p.done} for p in planned], indent=2))
    else:
        print(format_table(planned))
    skipped = sum(p.skip is not None for p in planned)
    if not args.json:
        print(f"{len(planned)} cell(s), {skipped} skipped by the plan")
    if args.plan_only:
        return 0
    preflight(planned)
    write_sweep(out, planned, {"grid": str(Path(args.grid).resolve()), "options": options})
    if args.slurm:
        from rosa_ds.sweep.slurm import submit

        submit(out, planned, args.array_limit, args.gpus_per_node, args.sbatch_arg)
        return 0
    from rosa_ds.sweep.local import run_local

    code = run_local(planned, out / "logs")
    print(f"results: rosa-ds sweep report {out}", file=sys.stderr)
    return code


def run_report(args: argparse.Namespace) -> int:
    from rosa_ds.sweep.report import format_report, report

    result = report(Path(args.folder), Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
