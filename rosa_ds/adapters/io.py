"""Adapter files: gather the full adapter from any ZeRO stage, write and read it.

The native file is ``adapter.safetensors`` (``<module>.lora_A`` / ``<module>.lora_B`` in fp32) plus
``adapter.json`` (method, rank, alpha, the adapted module names, the base model). Under ZeRO the
tensors are read from DeepSpeed's fp32 master copies, gathered whole: an adapter saved under
ZeRO-3 is complete, not the empty or partial shards some trainers write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.layer import MASK_FIELDS
from rosa_ds.adapters.trained_modules import NEW_TOKENS, trained_module_names, trained_params
from rosa_ds.errors import UserError
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.quant.files import quant_meta
from rosa_ds.zero_params import read_full

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def gather_adapter_state(model: nn.Module, has_optimizer: bool) -> dict[str, torch.Tensor]:
    """Every rank calls this (it may gather); every rank gets the full adapter tensors."""
    state = {}
    for name, module in adapted_modules(model).items():
        for attr, param in module.adapter_params().items():
            state[f"{name}.{attr}"] = read_full(param, master=has_optimizer)
    for key, param in trained_params(model).items():
        state[key] = read_full(param, master=has_optimizer)
    return state


def structure_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The masks' CSR indices, stored beside the values so an adapter file stands alone.
    Every rank calls this (ZeRO-3 gathers each mask in turn); ranks with ``keep`` get them."""
    state = {}
    for name, module in adapted_modules(model).items():
        mask = module.read_mask(keep)
        if mask is not None:
            state.update({f"{name}.{f}": getattr(mask, f) for f in MASK_FIELDS})
    return state


def adapter_meta(
    model: nn.Module, base_model: str, method: str, chat_template: str | None = None
) -> dict[str, Any]:
    """What an adapter file needs besides its tensors; ``method`` is the run's method name,
    ``chat_template`` the run's own (``data.chat_template`` as a name or Jinja), which export,
    eval and generate then give the tokenizer."""
    modules = adapted_modules(model)
    first = next(iter(modules.values()))
    sparse = sorted(n for n, m in modules.items() if m.sparse_values is not None)
    return quant_meta(model) | {
        "format": "rosa-ds-adapter",
        "version": 1,
        "method": method,
        "base_model": base_model,
        "rank": first.rank,
        "alpha": first.alpha,
        "dropout": float(getattr(first.dropout, "p", 0.0)),
        "modules": sorted(modules),
        "sparse_modules": sparse,
        "sparse_nnz": sum(modules[n].mask_nnz for n in sparse),
        "train_modules": trained_module_names(model),
        "new_special_tokens": getattr(model, NEW_TOKENS, []),
        "chat_template": chat_template,
    }


def _atomic_dir_write(folder: Path, write) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)  # a crash's leftover would block the rename
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    extra: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None,
) -> None:
    """Write the native adapter (``rosa-ds export`` adds the PEFT format); ``extra``: more
    safetensors files, ``{file name: (tensors, metadata)}``."""

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_FILE))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        for name, (tensors, metadata) in (extra or {}).items():
            save_file(tensors, str(tmp / name), metadata=metadata)

    _atomic_dir_write(Path(folder), write)


def masks_from_state(
    state: dict[str, torch.Tensor],
    names: list[str],
    shape_of,
    where: str,
) -> dict[str, SparseStructure]:
    """The masks an adapter file stores (CSR indices beside the values), checked against the
    layer shapes ``shape_of(name)`` gives; a broken or foreign file is one UserError."""
    masks = {}
    for name in names:
        try:
            masks[name] = SparseStructure.from_csr(
                state[f"{name}.row_ptr"], state[f"{name}.col_idx"], tuple(shape_of(name))
            )
        except (AttributeError, KeyError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"adapter in {where} has a broken mask for {name} ({exc}); save or export it "
                "again from its run"
            ) from None
    return masks


def is_delta(meta: dict[str, Any]) -> bool:
    """Does the file hold an accumulated update ``delta_B @ delta_A`` (a resampled run's
    final adapter) rather than the layers' own tensors?"""
    return "delta_ranks" in meta


def load_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = Path(folder)
    meta_path, file_path = folder / ADAPTER_META, folder / ADAPTER_FILE
    if not meta_path.is_file() or not file_path.is_file():
        raise UserError(
            f"{folder} is not a rosa-ds adapter (needs {ADAPTER_META} and "
            f"{ADAPTER_FILE}); point to a run's adapter/ folder"
        )
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(file_path))
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"adapter in {folder} cannot be read ({exc}); re-export it") from None
    return state, meta


def apply_adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor], allow_missing_sparse: bool = False
) -> None:
    """Copy adapter tensors into a model's (not yet partitioned) adapter parameters.

    Mask indices in ``state`` are skipped (masks are attached before). With
    ``allow_missing_sparse`` the sparse values may be absent (a LoRA state carried into a
    model that just got its masks; the values then stay zero).
    """
    modules = adapted_modules(model)
    whole = trained_params(model)
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[1] not in MASK_FIELDS}
    expected = {f"{n}.{a}" for n, m in modules.items() for a in m.adapter_params()} | set(whole)
    if allow_missing_sparse:
        expected = {k for k in expected if not k.endswith(".sparse_values")} | (
            set(state) & expected
        )
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise UserError(
            f"adapter does not match the model (missing {missing}, unexpected "
            f"{extra}); use the adapter with the base model and targets it was "
            "trained on"
        )
    for key, value in state.items():
        module, attr = key.rsplit(".", 1)
        param = whole[key] if key in whole else modules[module].adapter_params()[attr]
        if tuple(param.shape) != tuple(value.shape):
            raise UserError(
                f"adapter tensor {key} has shape {tuple(value.shape)} but the model "
                f"expects {tuple(param.shape)}; check adapter.rank and the base model"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
