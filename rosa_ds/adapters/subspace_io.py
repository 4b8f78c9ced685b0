"""Files of subspace adaptation: the frozen weights that resampling rewrote, and the adapter.

After a resample the frozen weight is ``W_fixed``, no longer the base model's, so checkpoints
carry the adapted matrices in their stored form (plain weights in the training dtype as
``<name>``, 4-bit records as ``<name>.qweight`` with their spec in the metadata), sharded: matrix
``i`` (in name order) belongs to rank ``i mod N``, which gathers it and writes it into
``frozen-<rank>-of-<N>.safetensors``, so every rank writes about 1/N of the bytes at once and
holds at most its share plus the one matrix being gathered. Reading works at any world size
(matrix ``i`` is read by rank ``i mod M`` and scattered), and a single ``frozen.safetensors``
(older checkpoints) is read the same way. The adapter written at the end of a run is the
update accumulated since the start, ``W_fixed + s B A - W_0``, which can have a rank far above ``r``: it is stored
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
from rosa_ds.adapters.trained_modules import trained_params
from rosa_ds.dist import rank_world
from rosa_ds.errors import UserError
from rosa_ds.quant.frozen import DenseFrozen
from rosa_ds.weight_files import read_tensor
from rosa_ds.zero_params import read_full

RECORDS = ".qweight"  # the key suffix of 4-bit records
FROZEN_IN_ADAPTER = "frozen.safetensors"


SHARD_GLOB = "frozen-*-of-*.safetensors"


def shard_file(rank: int, world: int) -> str:
    return f"frozen-{rank:05d}-of-{world:05d}.safetensors"


def frozen_files(folder: Path) -> list[Path]:
    """A checkpoint's frozen-weight files: its shards, or the single file of older ones."""
    shards = sorted(folder.glob(SHARD_GLOB))
    if shards:
        return shards
    return [folder / FROZEN_IN_ADAPTER] if (folder / FROZEN_IN_ADAPTER).is_file() else []


def write_frozen_shards(model: nn.Module, folder: Path) -> None:
    """Every rank calls this: each adapted frozen weight is gathered onto its owner (matrix
    ``i`` onto rank ``i mod N``), and every rank writes its share."""
    rank, world = rank_world()
    tensors, specs = {}, {}
    for i, (name, module) in enumerate(sorted(adapted_modules(model).items())):
        frozen, mine = module.frozen, i % world == rank
        stored = frozen.read_stored(keep=mine)
        if mine:
            spec = frozen.stored_spec()
            tensors[name + (RECORDS if spec else "")] = stored.contiguous()
            if spec:
                specs[name] = spec
    save_file(tensors, str(folder / shard_file(rank, world)), {"quant_specs": json.dumps(specs)})


def _file_of_each(files: list[Path]) -> dict[str, Path]:
    """Matrix name -> the file holding it (keys only: nothing is read)."""
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                where[key.removesuffix(RECORDS)] = path
    return where


def load_frozen_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint's frozen-weight files, by key (for tools and tests)."""
    out = {}
    for path in frozen_files(folder):
        with safe_open(str(path), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return out


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


def read_frozen_weights(model: nn.Module, folder: Path) -> None:
    """Every rank calls this: matrix ``i`` is read by rank ``i mod M`` (whatever world size
    wrote the files), turned into this run's stored form (dequantized or quantized when a run
    is resumed with other ``quant.bits``) and scattered to the shards."""
    rank, world = rank_world()
    files = frozen_files(folder)
    where = _file_of_each(files)
    for i, (name, module) in enumerate(sorted(adapted_modules(model).items())):
        frozen, value, reader = module.frozen, None, i % world
        if rank == reader:
            path = where.get(name, files[0])  # missing: _stored_entry names the problem
            with safe_open(str(path), framework="pt") as handle:
                tensor, spec = _stored_entry(handle, name, path)
            value = frozen.adopt(tensor, spec, f"{path}: {name}")
        frozen.write_stored(value, owner=reader)


def write_subspace_adapter(
    model: nn.Module,
    model_path: str,
    base_model: str,
    method: str,
    folder: Path,
    resamples: int,
    chat_template: str | None = None,
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
    whole = set(trained_params(model))  # adapter.train_modules
    trained = {
        k: v
        for k, v in gather_adapter_state(model, True).items()
        if k.rsplit(".", 1)[1] in keep or k in whole
    }
    frozen = gather_frozen_weights(model) if lossy else None
    masks = structure_state(model, keep=rank == 0)
    if rank != 0:
        return
    state.update(trained)
    state.update(masks)
    meta = adapter_meta(model, base_model, method, chat_template)
    meta.update(delta_ranks=ranks, resamples=resamples, exact_frozen=lossy)
    save_adapter(folder, state, meta, {FROZEN_IN_ADAPTER: frozen} if lossy else None)
