"""Checkpoints: DeepSpeed's own (trainable weights, optimizer, schedule) plus what is not a
parameter (trainer state, per-rank RNG) and the full adapter, written atomically.

Layout under ``<output_dir>/checkpoints``::

    step-000010/        DeepSpeed files, trainer_state.json, rng-rank<R>.pt, adapter/
    latest              the name of the newest complete checkpoint

A checkpoint is written under ``step-N.tmp`` and renamed once every rank has finished, and
``latest`` is replaced atomically after that, so an interrupted save leaves the previous
checkpoint and pointer intact. Frozen base weights are not stored (they are reloaded from the
base model) and are loaded non-strictly, so resuming never trips on them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rosa_ds.adapters.masks import save_masks
from rosa_ds.atomic import write_text_atomic
from rosa_ds.dist import barrier, rank_world
from rosa_ds.faults import exit_if
from rosa_ds.reshard import load_elastic

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MASK_FILE = "masks.safetensors"
TMP_SUFFIX = ".tmp"
TAG_RE = re.compile(r"^(step|warmup)-\d{6}$")
LEFTOVER_RE = re.compile(r"^\.?(step|warmup)-\d{6}(\.tmp|\.old)?$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int, prefix: str = "step") -> str:
    return f"{prefix}-{step:06d}"


def _by_age(folders) -> list[Path]:
    """Complete checkpoints, oldest first (by when they were completed, not by step: a
    robust-adaptation run restarts its step count after the warm-up pass)."""
    done = [p for p in folders if is_complete(p)]
    return sorted(done, key=lambda p: (p / STATE_FILE).stat().st_mtime_ns)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def is_complete(folder: Path) -> bool:
    """A finished checkpoint: a ``step-N``/``warmup-N`` folder (no suffix) with its state file."""
    return (
        folder.is_dir()
        and TAG_RE.match(folder.name) is not None
        and (folder / STATE_FILE).is_file()
    )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if it is sound, else a scan."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    done = _by_age(root.iterdir()) if root.is_dir() else []
    return done[-1] if done else None


SAVE_POINTS = ("begin", "engine", "extras", "state", "rename")


def _fault(point: str, step: int) -> None:
    """Crash on purpose at a named point of a save (``ROSA_DS_FAULT=save:<point>@<step>``)."""
    exit_if(f"save:{point}", step)


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders a crash left half-written: ignored by resume, removed by the next save."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and LEFTOVER_RE.match(p.name) is not None and not is_complete(p)
    )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    write_extras,
    keep: int,
    masks: dict | None = None,
    tag_prefix: str = "step",
) -> Path:
    """Every rank calls this. ``write_extras(folder)`` gathers and (on rank 0) writes what
    DeepSpeed does not store: the adapter and, after resamples, the rewritten frozen weights."""
    rank, _ = rank_world()
    root = checkpoint_root(output_dir)
    final = root / tag_for(step, tag_prefix)
    tmp_tag = tag_for(step, tag_prefix) + TMP_SUFFIX
    tmp = root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in incomplete_checkpoints(output_dir):
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()
    _fault("begin", step)
    engine.save_checkpoint(
        str(root),
        tag=tmp_tag,
        client_state={"rosa_ds": state},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    _fault("engine", step)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    write_extras(tmp)
    _fault("extras", step)
    barrier()
    if rank == 0:
        if masks:
            save_masks(tmp / MASK_FILE, masks)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fault("state", step)
        # Never a moment without a complete copy of this step: move the old one aside first.
        aside = root / f".{final.name}.old"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        _fault("rename", step)
        write_text_atomic(root / LATEST, final.name)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for old in _by_age(root.iterdir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, folder: Path) -> dict[str, Any]:
    """Restore the engine, this rank's RNG, and return the trainer state."""
    if not load_elastic(engine, folder):  # True: written by another world size, re-sharded
        engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    state = read_state(folder)
    rng_file = folder / f"rng-rank{rank_world()[0]}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
