"""From grid cells to runs: each cell's config validated, planned and given its folders.

A sweep folder holds ``sweep.json`` (every cell, its overrides and its plan), ``configs/`` (each
cell's resolved run config, what its run is started with), ``runs/<cell>/`` (each run's
``output_dir``) and ``logs/``. A cell is finished when its run wrote ``summary.json``; a cell
whose config changed since it first ran is refused rather than mixed into the old results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rosa_ds.atomic import write_text_atomic
from rosa_ds.config import RunConfig, dump_config, load_config
from rosa_ds.errors import UserError
from rosa_ds.plan import GIB, inputs_from_config, min_gpus, plan
from rosa_ds.sweep.grid import Cell, render

SWEEP_FILE = "sweep.json"
ENTRY = Path(__file__).resolve().parents[2] / "launcher" / "main.py"  # the per-rank entry


@dataclass
class PlannedCell:
    """A cell made concrete: its validated config, its files and what the planner said."""

    cell: Cell
    cfg: RunConfig
    config_file: Path
    output_dir: Path
    plan: dict[str, Any]  # peak_gib, step_seconds, gpu_hours, ... or {"error": why}
    skip: str | None = None  # why the cell is not run (it cannot fit)

    @property
    def done(self) -> bool:
        return (self.output_dir / "summary.json").is_file()

    def row(self) -> dict[str, Any]:
        return {
            "name": self.cell.name,
            "labels": self.cell.labels,
            "overrides": list(self.cell.overrides),
            "world_size": self.cell.world_size,
            "method": self.cfg.adapter.method_name,
            "model": self.cfg.model.name_or_path,
            "max_steps": self.cfg.train.max_steps,
            "config": str(self.config_file),
            "output_dir": str(self.output_dir),
            "plan": self.plan,
            "skip": self.skip,
        }


def _plan_cell(
    cfg: RunConfig, world: int, device: str, options: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The planner's figures for one cell, and why it cannot run (None: it fits)."""
    kw = {k: options[k] for k in ("tflops", "bandwidth_gbs") if options.get(k) is not None}
    try:
        inp = inputs_from_config(cfg, gpus=world, device=device, **kw)
        bd = plan(inp)
    except (UserError, KeyError, ValueError, OSError) as exc:
        return {"error": str(exc)}, None
    out = {
        "peak_gib": round(bd.peak / GIB, 4),
        "trainable_params": bd.trainable_params,
        "model_params": inp.model.params,
        "flops_step": bd.flops_step,
        "comm_step_gb": round(bd.comm_step / 1e9, 4),
        "step_seconds": bd.step_seconds,
        "gpu_hours": bd.gpu_hours,
        "device": device,
    }
    budget = options.get("gpu_memory_gib")
    if budget and bd.peak > budget * GIB:
        fits_at = min_gpus(inp, budget * GIB, limit=4096)
        hint = f"; fits at {fits_at} GPUs" if fits_at else ""
        return out, f"planned peak {bd.peak / GIB:.1f} GiB per GPU > {budget:g} GiB{hint}"
    return out, None


def check_divisible(cfg: RunConfig, world: int, name: str) -> None:
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise UserError(
            f"cell {name}: train.global_batch_size ({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size x ranks ({t.micro_batch_size} x {world}); set "
            f"train.global_batch_size to a multiple of {per_step} in the grid"
        )


def resolve_cells(
    cells: list[Cell], base: str | None, extra: list[str], out: Path, options: dict[str, Any]
) -> list[PlannedCell]:
    """Every cell's config (a bad one: one line, exit 2, before anything runs) and plan."""
    if base is None:
        raise UserError("sweep needs a base run config: --config NAME or base: in the grid file")
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise UserError("grid cells repeat a name; give the axes' choices distinct names")
    device = options.get("device") or "gpu"
    planned = []
    for cell in cells:
        output_dir = out / "runs" / cell.name
        overrides = [*cell.overrides, *extra, render("output_dir", str(output_dir))]
        try:
            cfg = load_config(base, overrides)
        except UserError as exc:
            raise UserError(f"cell {cell.name}: {exc}") from None
        check_divisible(cfg, cell.world_size, cell.name)
        figures, skip = _plan_cell(cfg, cell.world_size, device, options)
        planned.append(
            PlannedCell(cell, cfg, out / "configs" / f"{cell.name}.yaml", output_dir, figures, skip)
        )
    return planned


def check_launcher(cells: list[PlannedCell]) -> None:
    """Cells of several ranks start through ``launcher/main.py``: it must be there."""
    multi = [c.cell.name for c in cells if c.cell.world_size > 1 and not c.skip and not c.done]
    if multi and not ENTRY.is_file():
        raise UserError(
            f"cell {multi[0]} needs several ranks, which the sweep starts through "
            f"launcher/main.py, not found at {ENTRY}; run the sweep from a checkout"
        )


def preflight(planned: list[PlannedCell]) -> None:
    """The run's own pre-flight (model, data, tokenizer, output folder, resume) for every cell
    still to run, before the first starts: a mistake in cell 9 costs seconds, not 8 runs."""
    from rosa_ds.checkpoint import latest_checkpoint
    from rosa_ds.preflight import prepare

    check_launcher(planned)
    for p in planned:
        if p.skip or p.done:
            continue
        resume = "" if latest_checkpoint(p.output_dir) is not None else None
        try:
            prepare(p.cfg, resume=resume, training=True)
        except UserError as exc:
            raise UserError(f"cell {p.cell.name}: {exc}") from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def changed_settings(old_text: str, new_text: str) -> list[str]:
    """The keys whose values differ between a cell's config as it ran and now, and its world
    size (the header line). Keys only one side has (a newer rosa-ds added or dropped them, with
    their defaults) are not a change: an upgrade does not orphan a finished sweep."""
    old_head, new_head = old_text.split("\n", 1)[0], new_text.split("\n", 1)[0]
    old, new = _flat(yaml.safe_load(old_text) or {}), _flat(yaml.safe_load(new_text) or {})
    diff = [k for k in old.keys() & new.keys() if old[k] != new[k]]
    if old_head.startswith("#") and old_head != new_head:
        diff.append("world_size")
    return sorted(diff)


def write_sweep(out: Path, planned: list[PlannedCell], meta: dict[str, Any]) -> None:
    """``sweep.json`` and the cells' configs. A cell folder whose settings differ from the ones
    it ran with is refused: its results would mix two settings under one name."""
    for p in planned:
        if not (p.config_file.is_file() and p.output_dir.exists()):
            continue
        diff = changed_settings(p.config_file.read_text(), config_text(p))
        if diff:
            raise UserError(
                f"cell {p.cell.name} already ran in {out} with other settings "
                f"({', '.join(diff[:4])}); choose another --out or delete {p.output_dir} and "
                f"{p.config_file}"
            )
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for p in planned:
        write_text_atomic(p.config_file, config_text(p))
    write_text_atomic(
        out / SWEEP_FILE, json.dumps({**meta, "cells": [p.row() for p in planned]}, indent=2)
    )


def config_text(p: PlannedCell) -> str:
    """The cell's run config, with its world size (not a config key) in a comment, so that a
    change of either is a changed cell."""
    return f"# rosa-ds sweep cell {p.cell.name}: {p.cell.world_size} rank(s)\n" + dump_config(p.cfg)


def read_sweep(folder: Path) -> dict[str, Any]:
    path = folder / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError(
            f"{folder} is not a sweep folder (no {SWEEP_FILE}); give the --out of a sweep"
        ) from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc.msg}); re-run the sweep to rewrite it"
        ) from None


def figure(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """A figure, or ``-`` where the cell did not report it (not a misleading 0)."""
    width = int(spec.split(".")[0])
    if x is None:
        return "-".rjust(width + len(unit))
    return format(x / scale, spec) + unit


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_table(planned: list[PlannedCell]) -> str:
    """The planned table: one line per cell."""
    head = f"{'cell':<52} {'GPUs':>4} {'trainable':>11} {'peak GiB':>9} {'step s':>8} {'GPU-h':>8}  status"
    rows = [head]
    for p in planned:
        f = p.plan
        if "error" in f:
            rows.append(
                f"{p.cell.name:<52} {p.cell.world_size:>4} {'':>11} {'':>9} {'':>8} {'':>8}  plan n/a: {f['error']}"
            )
            continue

        status = f"skip: {p.skip}" if p.skip else ("done" if p.done else "to run")
        rows.append(
            f"{p.cell.name:<52} {p.cell.world_size:>4} {_count(f['trainable_params']):>11} "
            f"{f['peak_gib']:>9.2f} {figure(f['step_seconds'], '8.3f'):>8} "
            f"{figure(f['gpu_hours'], '8.1f'):>8}  {status}"
        )
    return "\n".join(rows)
