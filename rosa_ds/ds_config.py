"""DeepSpeed JSON configs from ``ds_configs/``, with their ``auto`` fields filled from the run config.

Only ``auto`` is filled; a value written in the JSON that contradicts the run config (a batch
size, the clipping, the precision) is an error rather than a silent winner.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from rosa_ds.config import RunConfig
from rosa_ds.errors import UserError


def _shipped_dir() -> Path:
    """``ds_configs/`` of a source checkout, else the copy a non-editable install made."""
    checkout = Path(__file__).resolve().parents[1] / "ds_configs"
    installed = Path(sys.prefix) / "share" / "rosa-ds" / "ds_configs"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


DS_CONFIG_DIR = _shipped_dir()


def ds_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(
                f"DeepSpeed config {name_or_path} not found; set deepspeed.config to "
                "a JSON path or a name in ds_configs/"
            )
        return path
    shipped = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise UserError(
            f"unknown DeepSpeed config {name_or_path!r}; choose one of: {names}, or a JSON path"
        )
    return shipped


def read_ds_config(name_or_path: str) -> dict[str, Any]:
    path = ds_config_path(name_or_path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _fill(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise UserError(
            f"DeepSpeed config sets {where}{key}={current} but the run config implies "
            f'{value}; set it to "auto" or change the run config'
        )


def build_ds_config(cfg: RunConfig, world_size: int, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run and world size."""
    t = cfg.train
    ds = copy.deepcopy(read_ds_config(cfg.deepspeed.config))
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size x ranks ({t.micro_batch_size} x {world_size}); set "
            f"train.global_batch_size to a multiple of {per_step}"
        )
    _fill(ds, "train_batch_size", t.global_batch_size, "")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", t.global_batch_size // per_step, "")
    _fill(
        ds, "gradient_clipping", t.grad_clip, ""
    )  # DeepSpeed's own default is 1.0: never leave it
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", t.precision == "bf16", "bf16.")
    if ds.get("fp16", {}).get("enabled") is True:
        raise UserError(
            "fp16 DeepSpeed configs are not supported; use bf16 or fp32 (train.precision)"
        )
    zero = ds.setdefault("zero_optimization", {})
    hidden_sq = hidden_size * hidden_size
    for key, value in {
        "reduce_bucket_size": hidden_sq,
        "allgather_bucket_size": hidden_sq,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_sq),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise UserError(
            f"DeepSpeed config has auto values rosa-ds cannot fill: {leftover}; give them numbers"
        )
    return ds


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
