"""Export: a merged Hugging Face model (loads with plain ``transformers``) and the adapter files.

Runs in one process without DeepSpeed: the base model is loaded, each adapted weight gets
``W + s B A`` added in fp32, and the result is saved with ``save_pretrained`` in the base's dtype.
An adapter trained on 4-bit frozen weights is merged into ``deq(q(W))`` (rebuilt exactly), the
weights it was trained against, so the bf16 merged model computes what the 4-bit model did.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from rosa_ds.adapters.inject import adapted_modules, inject_adapters
from rosa_ds.adapters.io import apply_adapter_state, load_adapter
from rosa_ds.config import AdapterConfig, ModelConfig
from rosa_ds.errors import UserError
from rosa_ds.kernels.csr import SparseStructure

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_adapted_model(
    adapter_dir: str | Path, base: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """The base model with the adapter from ``adapter_dir`` applied (not merged), and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from rosa_ds.model import check_model, load_tokenizer

    state, meta = load_adapter(adapter_dir)
    model_cfg = ModelConfig(name_or_path=base or meta["base_model"])
    path, _ = check_model(model_cfg)  # a typo or an offline hub id: one line, not a traceback
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    tokenizer = load_tokenizer(path, model_cfg)
    if meta.get("quant"):  # trained on 4-bit weights: merge into deq(q(W_0)), what it saw
        from rosa_ds.quant.files import rebuild_trained_base

        rebuild_trained_base(model, meta["quant"], path)
    if meta["method"] == "subspace":
        return _apply_subspace_delta(model, state, meta, adapter_dir), tokenizer, meta
    names = meta["modules"]
    cfg = AdapterConfig(
        rank=meta["rank"],
        alpha=meta["alpha"],
        dropout=0.0,
        targets=[n.replace(".", r"\.") for n in names],
        exclude=[],
    )
    inject_adapters(model, cfg)
    if sorted(adapted_modules(model)) != sorted(names):
        raise UserError(
            f"adapter in {adapter_dir} names modules this base model lacks; "
            "pass --base with the model it was trained on"
        )
    modules = adapted_modules(model)
    for name in meta.get("sparse_modules", []):
        shape = (modules[name].out_features, modules[name].in_features)
        try:
            structure = SparseStructure.from_csr(
                state[f"{name}.row_ptr"], state[f"{name}.col_idx"], shape
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"adapter in {adapter_dir} has a broken mask for {name} ({exc}); "
                "re-export it from its run"
            ) from None
        modules[name].attach_mask(structure)
    apply_adapter_state(model, state)
    model.eval()
    return model, tokenizer, meta


def _apply_subspace_delta(model, state, meta, adapter_dir) -> torch.nn.Module:
    """Add the accumulated update ``delta_B @ delta_A`` (and the sparse part) to each weight."""
    for name in meta["modules"]:
        try:
            weight = model.get_submodule(name).weight
            delta = state[f"{name}.delta_B"].float() @ state[f"{name}.delta_A"].float()
            if name in meta.get("sparse_modules", []):
                structure = SparseStructure.from_csr(
                    state[f"{name}.row_ptr"], state[f"{name}.col_idx"], tuple(weight.shape)
                )
                delta += structure.to_dense(state[f"{name}.sparse_values"].float())
        except (AttributeError, KeyError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"adapter in {adapter_dir} does not fit the base model at {name} ({exc}); "
                "pass --base with the model it was trained on"
            ) from None
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
    model.eval()
    return model


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain linear layer back."""
    for name, module in list(adapted_modules(model).items()):
        weight = module.base.weight
        with torch.no_grad():
            weight.copy_((weight.float() + module.delta_weight()).to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


def export(
    adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto"
) -> dict[str, str]:
    """Write ``out_dir/merged`` (HF model + tokenizer) and copy the adapter to ``out_dir/adapter``."""
    out = Path(out_dir)
    torch_dtype = None if dtype == "auto" else DTYPES[dtype]
    model, tokenizer, meta = load_adapted_model(adapter_dir, base, torch_dtype)
    merge_adapters(model)
    model.config.use_cache = True
    merged = out / "merged"
    tmp = out / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(merged, ignore_errors=True)
    tmp.rename(merged)
    adapter_out = out / "adapter"
    if Path(adapter_dir).resolve() != adapter_out.resolve():
        shutil.rmtree(adapter_out, ignore_errors=True)
        shutil.copytree(adapter_dir, adapter_out)
    written = {"merged": str(merged), "adapter": str(adapter_out)}
    if (adapter_out / "peft").is_dir():
        written["peft"] = str(adapter_out / "peft")
    return written
