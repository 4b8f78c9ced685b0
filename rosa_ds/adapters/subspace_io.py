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


def _quantized(module) -> bool:
    return hasattr(module.base, "qweight")


def write_frozen_weights(built, path: Path) -> None:
    """Every rank calls this; rank 0 writes the adapted frozen weights (fp32 is not forced:
    the file keeps the training dtype; 4-bit layers keep their records, ``<name>.qweight``)."""
    rank = _rank()
    tensors, specs = {}, {}
    for name, module in sorted(adapted_modules(built.model).items()):
        if _quantized(module):
            q = module.base.read_records(keep=rank == 0)
            if rank == 0:
                tensors[f"{name}.qweight"] = q.contiguous()
                specs[name] = module.base.spec.to_dict()
            continue
        w = read_full(module.base.weight, master=False, keep=rank == 0)
        if rank == 0:
            tensors[name] = w.to(module.base.weight.dtype).contiguous()
    if rank == 0:
        save_file(tensors, str(path), metadata={"quant_specs": json.dumps(specs)})


def read_frozen_weights(built, path: Path) -> None:
    """Every rank calls this: rank 0 reads the file, the weights are scattered to the shards."""
    rank = _rank()
    modules = sorted(adapted_modules(built.model).items())
    handle = safe_open(str(path), framework="pt") if rank == 0 else None
    keys = set(handle.keys()) if rank == 0 else set()
    for name, module in modules:
        value = None
        if _quantized(module) or (rank == 0 and f"{name}.qweight" in keys):
            _read_quantized(module, name, handle, keys, path, rank)
            continue
        if rank == 0:
            if name not in keys:
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


def _read_quantized(module, name: str, handle, keys: set[str], path: Path, rank: int) -> None:
    """A 4-bit layer from its records (or quantizing a plain weight: a run resumed with
    ``quant.bits=4``); a plain layer from records (dequantized: resumed with ``quant.bits=16``).
    Every rank calls this; rank 0 reads."""
    from rosa_ds.quant.nf4 import QuantSpec, dequantize

    has_q = f"{name}.qweight" in keys
    if rank == 0 and not has_q and name not in keys:
        raise UserError(
            f"{path} lacks the frozen weight of {name}; the checkpoint does not match this model"
        )
    if _quantized(module):
        spec = module.base.spec
        if rank == 0 and has_q:
            stored = json.loads((handle.metadata() or {}).get("quant_specs", "{}")).get(name)
            if stored is None or QuantSpec.from_dict(stored) != spec:
                raise UserError(
                    f"{path}: the 4-bit records of {name} were written with {stored}, this run "
                    f"quantizes with {spec.to_dict()}; resume with the same quant.* settings"
                )
        # every rank learns which kind rank 0 found, so all take the same collective path
        from rosa_ds.adapters.resample import broadcast

        kind = broadcast(torch.tensor([float(has_q)]) if rank == 0 else None, (1,), 0)
        if float(kind[0]):
            module.base.write_records(
                handle.get_tensor(f"{name}.qweight") if rank == 0 else None, 0
            )
        else:
            module.base.write_full(handle.get_tensor(name) if rank == 0 else None, 0)
        return
    value = None
    if rank == 0:
        stored = json.loads((handle.metadata() or {}).get("quant_specs", "{}"))[name]
        value = dequantize(handle.get_tensor(f"{name}.qweight"), QuantSpec.from_dict(stored))
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
        if _quantized(m):
            w = m.base.read_full(keep=rank == 0)
        else:
            w = read_full(m.base.weight, master=False, keep=rank == 0)
        a = read_full(m.lora_A, master=True, keep=rank == 0)
        b = read_full(m.lora_B, master=True, keep=rank == 0)
        if rank != 0:
            continue
        # W_0 as training saw it (the training dtype; 4-bit: deq(q(W_0))), so that untouched
        # entries cancel exactly
        w0 = base_weight(built.model_path, f"{name}.weight")
        if _quantized(m):
            from rosa_ds.quant.nf4 import dequantize, quantize

            spec = m.base.spec
            w0 = dequantize(quantize(w0.to(m.base.source_dtype), spec), spec, torch.float32)
        else:
            w0 = w0.to(m.base.weight.dtype).float()
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
