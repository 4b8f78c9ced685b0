"""Where a tensor of a local Hugging Face safetensors checkpoint is (single file or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def tensor_files(folder: str | Path) -> dict[str, Path] | None:
    """Tensor name -> file for a local safetensors checkpoint, or None if it is not one."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def has_safetensors(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / SINGLE).is_file() or (folder / INDEX).is_file()


def read_tensor(folder: str | Path, key: str) -> torch.Tensor:
    """One tensor of the checkpoint, read lazily (the rest of its file stays on disk)."""
    files = tensor_files(folder) or {}
    if key not in files:
        raise KeyError(f"{key} is not in the safetensors checkpoint {folder}")
    with safe_open(str(files[key]), framework="pt") as f:
        return f.get_tensor(key)
