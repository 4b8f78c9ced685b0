"""The grid file of ``rosa-ds sweep``: axes of config overrides, expanded into cells with stable
names (a cell's name comes from its own choices, so adding a value to an axis adds cells and
renames none).

    base: tiny-lora                # the run config (or --config)
    fixed: {train.max_steps: 20}   # overrides every cell gets
    axes:                          # the product of the axes, in this order
      model:                       # named choices: each a set of overrides
        1m: {model.name_or_path: builtin:ladder-1m}
        4m: {model.name_or_path: builtin:ladder-4m}
      method:
        lora: {adapter.rank: 8}
        rosa: {adapter.rank: 8, adapter.density: 0.01}
      seed: [0, 1]                 # a config key and its values
      world_size: [1, 2]           # ranks (GPUs) of the cell's run
    exclude:                       # optional: drop the cells that match every key
      - {model: 4m, world_size: 2}
    plan: {gpu_memory_gib: 80, tflops: 400}   # optional: the planner's budget and speed

A cell is named by its axes in file order, ``model-1m__method-lora__seed-0__world_size-2``:
a key axis by its last component (the whole key where two axes would share it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rosa_ds.config import parse_override
from rosa_ds.errors import UserError

WORLD_SIZE = "world_size"
PLAN_KEYS = {"gpu_memory_gib", "tflops", "bandwidth_gbs", "device"}


@dataclass(frozen=True)
class Choice:
    """One value of an axis: its label in cell names and what it sets."""

    label: str
    overrides: tuple[str, ...]
    world_size: int | None = None


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: a config key's values, or named sets of overrides."""

    name: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the sweep."""

    name: str
    overrides: tuple[str, ...]  # fixed first, then each axis in order (a later axis wins)
    world_size: int
    labels: dict[str, str] = field(default_factory=dict)  # axis -> label, for the report


@dataclass
class Grid:
    """A parsed grid file: what every cell shares and the axes it varies."""

    base: str | None
    fixed: tuple[str, ...]
    axes: list[Axis]
    plan: dict[str, Any]
    world_size: int = 1  # of cells no axis gives one (``fixed: {world_size: N}``)
    exclude: list[dict[str, list[str]]] = field(default_factory=list)  # axis -> labels

    def cells(self) -> list[Cell]:
        return expand(self)


def render(key: str, value: Any) -> str:
    """``key=value`` as a dotted override, the value written so that parsing gives it back."""
    if isinstance(value, str) and yaml.safe_load(value) == value and "\n" not in value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.split(":")[-1]).strip("_")
    return text or "empty"


def _settings(where: str, raw: Any) -> tuple[tuple[str, ...], int | None]:
    """Overrides and world size of a mapping of dotted keys (``world_size`` among them)."""
    if not isinstance(raw, dict):
        raise UserError(f"grid {where} must be a mapping of config keys to values, got {raw!r}")
    overrides, world = [], None
    for key, value in raw.items():
        if key == WORLD_SIZE:
            world = _ranks_of(where, value)
        else:
            overrides.append(render(str(key), value))
    return tuple(overrides), world


def _ranks_of(where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"grid {where}: world_size must be an integer >= 1, got {value!r}")
    return value


def _axis(name: str, raw: Any) -> Axis:
    if isinstance(raw, list):
        if not raw:
            raise UserError(f"grid axis {name} has no values; give at least one")
        if name == WORLD_SIZE:
            choices = [Choice(str(_ranks_of(name, v)), (), v) for v in raw]
        else:
            choices = [Choice(_label(v), (render(name, v),)) for v in raw]
    elif isinstance(raw, dict):
        if not raw:
            raise UserError(f"grid axis {name} has no choices; give at least one")
        choices = [
            Choice(_label(str(k)), *_settings(f"axis {name}.{k}", v)) for k, v in raw.items()
        ]
    else:
        raise UserError(
            f"grid axis {name} must be a list of values or a mapping of named choices, got {raw!r}"
        )
    labels = [c.label for c in choices]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(
            f"grid axis {name}: values {dupes} give the same cell name; use named choices "
            "(a mapping of name to overrides) to tell them apart"
        )
    return Axis(name, tuple(choices))


def parse_grid(raw: Any, where: str = "grid") -> Grid:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a YAML mapping with an axes: section")
    unknown = sorted(set(raw) - {"base", "fixed", "axes", "exclude", "plan"})
    if unknown:
        raise UserError(
            f"{where}: unknown section {unknown[0]}; use base, fixed, axes, exclude and plan"
        )
    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise UserError(f"{where} needs an axes: mapping with at least one axis")
    fixed_raw = raw.get("fixed") or {}
    if isinstance(fixed_raw, list):  # dotted overrides as on the command line: key=value
        fixed_raw = dict(parse_override(str(item)) for item in fixed_raw)
    fixed, fixed_world = _settings("fixed", fixed_raw)
    plan = raw.get("plan") or {}
    if not isinstance(plan, dict) or set(plan) - PLAN_KEYS:
        raise UserError(f"{where}: plan takes {', '.join(sorted(PLAN_KEYS))}, got {plan!r}")
    for key in PLAN_KEYS - {"device"}:
        value = plan.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value <= 0):  # fmt: skip
            raise UserError(f"{where}: plan.{key} must be a number > 0, got {value!r}")
    if plan.get("device") not in (None, "gpu", "cpu"):
        raise UserError(f"{where}: plan.device must be gpu or cpu, got {plan['device']!r}")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{where}: base must be a config name or path, got {base!r}")
    axes = [_axis(str(k), v) for k, v in axes_raw.items()]
    sizing = [a.name for a in axes if any(c.world_size for c in a.choices)]
    if len(sizing) > 1 or (sizing and fixed_world):
        where_set = sizing + (["fixed"] if fixed_world else [])
        raise UserError(
            f"{where}: world_size is set by {', '.join(where_set)}; let one axis (or fixed) set it"
        )
    exclude = _exclude(raw.get("exclude") or [], axes, where)
    grid = Grid(base, fixed, axes, dict(plan), fixed_world or 1, exclude)
    if not grid.cells():
        raise UserError(f"{where}: exclude leaves no cell to run; loosen its rules")
    return grid


def _exclude(raw: Any, axes: list[Axis], where: str) -> list[dict[str, list[str]]]:
    """Exclusion rules: each maps axes to a label or a list of labels of that axis."""
    if not isinstance(raw, list) or not all(isinstance(r, dict) and r for r in raw):
        raise UserError(f"{where}: exclude must be a list of mappings of axis to label(s)")
    labels = {a.name: {c.label for c in a.choices} for a in axes}
    rules = []
    for rule in raw:
        parsed = {}
        for axis, value in rule.items():
            values = [_label(v) for v in (value if isinstance(value, list) else [value])]
            unknown = [v for v in values if v not in labels.get(str(axis), ())]
            if str(axis) not in labels or unknown:
                raise UserError(
                    f"{where}: exclude names {axis}={unknown or value}, which no axis has; "
                    f"axes: {', '.join(f'{k} {sorted(v)}' for k, v in labels.items())}"
                )
            parsed[str(axis)] = values
        rules.append(parsed)
    return rules


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(
            f"cannot read grid file {path} ({exc.strerror}); give a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(
            f"grid file {path} is not valid YAML ({str(exc).splitlines()[0]})"
        ) from None
    return parse_grid(raw, where=f"grid file {path}")


def _short_names(axes: list[Axis]) -> list[str]:
    short = [a.name.split(".")[-1] for a in axes]
    names = [s if short.count(s) == 1 else a.name for s, a in zip(short, axes, strict=True)]
    return [re.sub(r"[^A-Za-z0-9._+-]+", "_", n).strip("._") or "axis" for n in names]


MAX_NAME = 160  # a cell's folder, config and log carry its name; file names stop at 255 bytes


def _cell_name(parts: list[str]) -> str:
    name = "__".join(parts)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_NAME - 12]}__{digest}"


def expand(grid: Grid) -> list[Cell]:
    """Every combination of the axes' choices, in file order (the last axis varies fastest)."""
    shorts = _short_names(grid.axes)
    cells = []
    for combo in itertools.product(*(a.choices for a in grid.axes)):
        overrides = list(grid.fixed)
        world = grid.world_size
        for choice in combo:
            overrides += choice.overrides
            world = choice.world_size or world
        name = _cell_name([f"{s}-{c.label}" for s, c in zip(shorts, combo, strict=True)])
        labels = {a.name: c.label for a, c in zip(grid.axes, combo, strict=True)}
        if any(all(labels[k] in v for k, v in rule.items()) for rule in grid.exclude):
            continue
        cells.append(Cell(name, tuple(overrides), world, labels))
    return cells
