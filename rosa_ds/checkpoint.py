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
import shutil
from pathlib import Path
from typing import Any

import torch

from rosa_ds.dist import barrier

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MASK_FILE = "masks.safetensors"
TMP_SUFFIX = ".tmp"


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
    return (
        folder.is_dir() and (folder / STATE_FILE).is_file() and not folder.name.endswith(TMP_SUFFIX)
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


FAULT_ENV = "ROSA_DS_FAULT"
SAVE_POINTS = ("begin", "engine", "extras", "state", "rename")


def _fault(point: str, step: int) -> None:
    """Crash on purpose at a named point of a save, for the tests that prove saves atomic:
    ``ROSA_DS_FAULT=save:<point>@<step>`` exits this process at once, as a kill would."""
    if os.environ.get(FAULT_ENV) == f"save:{point}@{step}":
        os._exit(17)


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders a crash left half-written (ignored by resume, removed by the next save)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_complete(p))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    import torch.distributed as dist

    rank = dist.get_rank()
    root = checkpoint_root(output_dir)
    final = root / tag_for(step, tag_prefix)
    tmp_tag = tag_for(step, tag_prefix) + TMP_SUFFIX
    tmp = root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
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
            from rosa_ds.adapters.masks import save_masks

            save_masks(tmp / MASK_FILE, masks)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fault("state", step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fault("rename", step)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for old in _by_age(root.iterdir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


FROZEN_FILE = "frozen.safetensors"


def load_checkpoint(engine: Any, folder: Path) -> dict[str, Any]:
    """Restore the engine, this rank's RNG, and return the trainer state."""
    import torch.distributed as dist

    _, client = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_module_strict=False
    )
    state = read_state(folder)
    rng_file = folder / f"rng-rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
