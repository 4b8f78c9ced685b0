"""Files of subspace adaptation: the frozen weights that resampling rewrote, and the adapter.

After a resample the frozen weight is ``W_fixed``, no longer the base model's, so checkpoints
carry ``frozen.safetensors`` (the adapted matrices, gathered one at a time). The adapter written
at the end of a run is the update accumulated since the start, ``W_fixed + s B A - W_0``, which
can have a rank far above ``r``: it is stored factorized at its numerical rank (at most
``2 r (resamples + 1)``, the rank it can reach in exact arithmetic) as ``delta_B @ delta_A``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.io import adapter_meta, gather_adapter_state, save_adapter, structure_state
from rosa_ds.adapters.resample import lowrank_delta, read_full, write_frozen
from rosa_ds.errors import UserError


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def write_frozen_weights(built, path: Path) -> None:
    """Every rank calls this; rank 0 writes the adapted frozen weights (fp32 is not forced:
    the file keeps the training dtype)."""
    rank = _rank()
    tensors = {}
    for name, module in sorted(adapted_modules(built.model).items()):
        w = read_full(module.base.weight, master=False, keep=rank == 0)
        if rank == 0:
            tensors[name] = w.to(module.base.weight.dtype).contiguous()
    if rank == 0:
        save_file(tensors, str(path))


def read_frozen_weights(built, path: Path) -> None:
    """Every rank calls this: rank 0 reads the file, the weights are scattered to the shards."""
    rank = _rank()
    modules = sorted(adapted_modules(built.model).items())
    handle = safe_open(str(path), framework="pt") if rank == 0 else None
    for name, module in modules:
        value = None
        if rank == 0:
            if name not in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                raise UserError(
                    f"{path} lacks the frozen weight of {name}; the checkpoint does "
                    "not match this model"
                )
            value = handle.get_tensor(name)
            shape = (module.out_features, module.in_features)
            if tuple(value.shape) != shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the model "
                    f"{shape}; the checkpoint does not match this model"
                )
        write_frozen(module.base.weight, value, owner=0)


def base_weight(model_path: str, key: str) -> torch.Tensor:
    """One tensor of the base checkpoint (safetensors, single file or sharded), read lazily."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        file = folder / json.loads(index.read_text())["weight_map"][key]
    else:
        file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def write_subspace_adapter(cfg, built, folder: Path, resamples: int) -> None:
    """Every rank calls this; rank 0 factorizes each accumulated update and writes the file."""
    rank = _rank()
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, m in sorted(adapted_modules(built.model).items()):
        w = read_full(m.base.weight, master=False, keep=rank == 0)
        a = read_full(m.lora_A, master=True, keep=rank == 0)
        b = read_full(m.lora_B, master=True, keep=rank == 0)
        if rank != 0:
            continue
        # W_0 in the training dtype, so that untouched entries cancel exactly
        w0 = base_weight(built.model_path, f"{name}.weight").to(m.base.weight.dtype).float()
        delta = w + m.scale * (b @ a) - w0
        db, da = lowrank_delta(delta, min(2 * m.rank * (resamples + 1), min(delta.shape)))
        state[f"{name}.delta_A"], state[f"{name}.delta_B"] = da.contiguous(), db.contiguous()
        ranks[name] = int(da.shape[0])
    sparse = {
        k: v
        for k, v in gather_adapter_state(built.model, True).items()
        if k.endswith(".sparse_values")
    }
    if rank != 0:
        return
    state.update(sparse)
    state.update(structure_state(built.model))
    meta = adapter_meta(built.model, cfg.model.name_or_path)
    meta.update(method="subspace", delta_ranks=ranks, resamples=resamples)
    save_adapter(folder, state, meta)
