"""A base model with an adapter folder applied, for inference in one process without DeepSpeed:
``export`` merges and saves it, ``rosa-ds eval`` evaluates adapters that exist only merged (a
resampled run's accumulated update).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rosa_ds.adapters.inject import adapted_modules, inject_adapters
from rosa_ds.adapters.io import apply_adapter_state, is_delta, load_adapter, masks_from_state
from rosa_ds.adapters.subspace_io import read_stored_dense
from rosa_ds.adapters.trained_modules import grow_vocabulary, load_trained_state
from rosa_ds.config import AdapterConfig, ModelConfig
from rosa_ds.errors import UserError
from rosa_ds.kernels.sparse_linear import release_merge
from rosa_ds.model import check_model, load_tokenizer
from rosa_ds.quant.files import rebuild_trained_base

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_adapted_model(
    adapter_dir: str | Path, base: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """The base model with the adapter from ``adapter_dir`` applied (not merged), and its tokenizer."""
    state, meta = load_adapter(adapter_dir)
    tokens = meta.get("new_special_tokens", [])
    model_cfg = ModelConfig(name_or_path=base or meta["base_model"], new_special_tokens=tokens)
    path, _ = check_model(model_cfg)  # a typo or an offline hub id: one line, not a traceback
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", **model_cfg.pretrained_kwargs()
    )
    tokenizer = load_tokenizer(path, model_cfg)
    if meta.get("chat_template"):  # the run's own (data.chat_template), not the base's
        tokenizer.chat_template = meta["chat_template"]
    grow_vocabulary(model, len(tokenizer), tokens)
    if meta.get("quant"):  # trained on 4-bit weights: merge into deq(q(W_0)), what it saw
        rebuild_trained_base(model, meta["quant"], path)
    if is_delta(meta):
        return _apply_subspace_delta(model, state, meta, adapter_dir), tokenizer, meta
    names = meta["modules"]
    cfg = AdapterConfig(
        method="full" if meta.get("method") == "full" else "auto",
        rank=meta["rank"],
        alpha=meta["alpha"],
        dropout=0.0,
        targets=[re.escape(n) for n in names],
        exclude=[],
        train_modules=[re.escape(n) for n in meta.get("train_modules", [])],
    )
    inject_adapters(model, cfg)
    if sorted(adapted_modules(model)) != sorted(names):
        raise UserError(
            f"adapter in {adapter_dir} names modules this base model lacks; "
            "pass --base with the model it was trained on"
        )
    modules = adapted_modules(model)
    sparse = meta.get("sparse_modules", [])

    def shape_of(name: str) -> tuple[int, int]:
        return modules[name].out_features, modules[name].in_features

    for name, structure in masks_from_state(state, sparse, shape_of, adapter_dir).items():
        modules[name].attach_mask(structure)
    apply_adapter_state(model, state)
    model.eval()
    return model, tokenizer, meta


def _apply_subspace_delta(model, state, meta, adapter_dir) -> torch.nn.Module:
    """Add the accumulated update ``delta_B @ delta_A`` (and the sparse part) to each weight;
    an adapter trained on 4-bit weights (``exact_frozen``) instead rebuilds each weight from
    its final frozen records and factors, ``deq(Q) + s B A``, exactly what training computed."""
    exact = meta.get("exact_frozen", False)
    scale = meta["alpha"] / meta["rank"] if meta.get("rank") else 0.0
    for name in meta["modules"]:
        try:
            weight = model.get_submodule(name).weight
            if exact:
                base = read_stored_dense(Path(adapter_dir), name, tuple(weight.shape))
                with torch.no_grad():
                    weight.copy_(base.to(weight.dtype))
                factors = state[f"{name}.lora_B"].float() @ state[f"{name}.lora_A"].float()
                delta = scale * factors
            else:
                delta = state[f"{name}.delta_B"].float() @ state[f"{name}.delta_A"].float()
            if name in meta.get("sparse_modules", []):
                shape_of = lambda _, shape=tuple(weight.shape): shape  # noqa: E731
                structure = masks_from_state(state, [name], shape_of, adapter_dir)[name]
                delta += structure.to_dense(state[f"{name}.sparse_values"].float())
        except (AttributeError, KeyError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"adapter in {adapter_dir} does not fit the base model at {name} ({exc}); "
                "pass --base with the model it was trained on"
            ) from None
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
    load_trained_state(model, state, meta.get("train_modules", []))
    model.eval()
    return model


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the plain linear layer back."""
    for name, module in list(adapted_modules(model).items()):
        weight = module.base.weight
        release_merge(weight)  # W0, not W0 + S held for training
        with torch.no_grad():
            weight.copy_((weight.float() + module.delta_weight()).to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model
