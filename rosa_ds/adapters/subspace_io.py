"""Files of subspace adaptation: the frozen weights that resampling rewrote, and the adapter.

After a resample the frozen weight is ``W_fixed``, no longer the base model's, so checkpoints
carry ``frozen.safetensors`` (the adapted matrices in their stored form, gathered one at a time:
plain weights in the training dtype as ``<name>``, 4-bit records as ``<name>.qweight`` with their
spec in the metadata). The adapter written at the end of a run is the update accumulated since
the start, ``W_fixed + s B A - W_0``, which can have a rank far above ``r``: it is stored
factorized at its numerical rank (at most ``2 r (resamples + 1)``, the rank it can reach in exact
arithmetic) as ``delta_B @ delta_A``. With 4-bit frozen weights that update also holds the
re-quantization error of every resample, which has full rank, so the factorized update cannot
reproduce the trained model; such an adapter also carries the final frozen records
(``frozen.safetensors``) and factors, from which export and evaluation rebuild exactly
``deq(Q) + s B A`` (+ S), the function the run trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.io import adapter_meta, gather_adapter_state, save_adapter, structure_state
from rosa_ds.adapters.resample import lowrank_delta
from rosa_ds.dist import rank_world
from rosa_ds.errors import UserError
from rosa_ds.quant.frozen import DenseFrozen
from rosa_ds.weight_files import read_tensor
from rosa_ds.zero_params import read_full

RECORDS = ".qweight"  # the key suffix of 4-bit records
FROZEN_IN_ADAPTER = "frozen.safetensors"


def write_frozen_weights(model: nn.Module, path: Path) -> None:
    """Every rank calls this; rank 0 writes the adapted frozen weights in their stored form."""
    gathered = gather_frozen_weights(model)
    if gathered is not None:
        save_file(gathered[0], str(path), metadata=gathered[1])


def gather_frozen_weights(
    model: nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Every rank calls this; rank 0 gets the stored form of every adapted frozen weight and
    the file metadata (the 4-bit specs), the others None."""
    rank, _ = rank_world()
    tensors, specs = {}, {}
    for name, module in sorted(adapted_modules(model).items()):
        frozen = module.frozen
        stored = frozen.read_stored(keep=rank == 0)
        spec = frozen.stored_spec()
        if rank == 0:
            tensors[name + (RECORDS if spec else "")] = stored.contiguous()
            if spec:
                specs[name] = spec
    return (tensors, {"quant_specs": json.dumps(specs)}) if rank == 0 else None


def _stored_entry(handle, name: str, path: Path) -> tuple[torch.Tensor, dict | None]:
    """One matrix of an open frozen-weight file: 4-bit records and their spec, or a plain
    weight and None."""
    if name + RECORDS in set(handle.keys()):
        specs = json.loads((handle.metadata() or {}).get("quant_specs", "{}"))
        return handle.get_tensor(name + RECORDS), specs.get(name)
    if name in set(handle.keys()):
        return handle.get_tensor(name), None
    raise UserError(
        f"{path} lacks the frozen weight of {name}; the checkpoint does not match this model"
    )


def read_stored_dense(folder: Path, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """One frozen weight of a frozen-weight file as a plain fp32 tensor (4-bit: dequantized)."""
    path = folder / FROZEN_IN_ADAPTER
    with safe_open(str(path), framework="pt") as f:
        tensor, spec = _stored_entry(f, name, path)
    where = f"{path}: {name}"
    linear = nn.Linear(shape[1], shape[0], bias=False, device="meta")
    return DenseFrozen(linear).adopt(tensor, spec, where).float()


def read_frozen_weights(model: nn.Module, path: Path) -> None:
    """Every rank calls this: rank 0 reads the file and turns each entry into this run's stored
    form (dequantizing or quantizing when a run is resumed with other ``quant.bits``), then
    the weights are scattered to the shards."""
    rank, _ = rank_world()
    handle = safe_open(str(path), framework="pt") if rank == 0 else None
    for name, module in sorted(adapted_modules(model).items()):
        frozen, value = module.frozen, None
        if rank == 0:
            tensor, spec = _stored_entry(handle, name, path)
            value = frozen.adopt(tensor, spec, f"{path}: {name}")
        frozen.write_stored(value, owner=0)


def write_subspace_adapter(
    model: nn.Module, model_path: str, base_model: str, method: str, folder: Path, resamples: int
) -> None:
    """Every rank calls this; rank 0 factorizes each accumulated update and writes the file."""
    rank, _ = rank_world()
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, m in sorted(adapted_modules(model).items()):
        w = m.frozen.read_full(keep=rank == 0)
        a = read_full(m.lora_A, master=True, keep=rank == 0)
        b = read_full(m.lora_B, master=True, keep=rank == 0)
        if rank != 0:
            continue
        # W_0 as training saw it (the training dtype; 4-bit: deq(q(W_0))), so that untouched
        # entries cancel exactly
        w0 = m.frozen.as_trained(read_tensor(model_path, f"{name}.weight"))
        delta = w + m.scale * (b @ a) - w0
        db, da = lowrank_delta(delta, min(2 * m.rank * (resamples + 1), min(delta.shape)))
        state[f"{name}.delta_A"], state[f"{name}.delta_B"] = da.contiguous(), db.contiguous()
        ranks[name] = int(da.shape[0])
    lossy = any(m.frozen.lossy for m in adapted_modules(model).values())
    keep = ("sparse_values", "lora_A", "lora_B") if lossy else ("sparse_values",)
    trained = {
        k: v for k, v in gather_adapter_state(model, True).items() if k.rsplit(".", 1)[1] in keep
    }
    frozen = gather_frozen_weights(model) if lossy else None
    if rank != 0:
        return
    state.update(trained)
    state.update(structure_state(model))
    meta = adapter_meta(model, base_model, method)
    meta.update(delta_ranks=ranks, resamples=resamples, exact_frozen=lossy)
    save_adapter(folder, state, meta, {FROZEN_IN_ADAPTER: frozen} if lossy else None)
