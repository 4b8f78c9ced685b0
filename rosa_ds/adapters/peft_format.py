"""The PEFT format of an adapter: a folder that ``peft`` loads with no rosa-ds installed.

Written by ``rosa-ds export`` through peft's own ``LoraConfig`` (not at every save: importing
peft costs seconds per process). LoRA adapters map one to one. A subspace (ROSA) run's final
adapter, the accumulated update stored as ``delta_B @ delta_A`` at each matrix's own numerical
rank, is a LoRA with ``rank_pattern`` (those ranks) and ``alpha_pattern`` equal to them, so its
scale is 1. Modules trained whole (``adapter.train_modules``) are PEFT's ``modules_to_save``;
with new tokens the folder also holds the tokenizer, from which ``AutoPeftModelForCausalLM``
resizes the base model's embeddings. Adapters with a sparse part (PEFT has no sparse adapters) and subspace runs on 4-bit
weights (whose update holds full-rank re-quantization error) have no PEFT form.
``base_model_name_or_path`` is something ``AutoPeftModelForCausalLM`` can load (export
resolves it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rosa_ds.adapters.io import is_delta

WEIGHTS = "adapter_model.safetensors"


def peft_exportable(meta: dict[str, Any]) -> bool:
    if meta.get("sparse_modules"):
        return False
    if meta["method"] == "lora":
        return True
    return is_delta(meta) and not meta.get("exact_frozen")


def write_peft(
    folder: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], base: str
) -> None:
    """``adapter_config.json`` (peft's ``LoraConfig``) and ``adapter_model.safetensors``;
    ``base``: the loadable base model (``export.loadable_base``)."""
    from peft import LoraConfig

    delta = is_delta(meta)
    attrs = ("delta_A", "delta_B") if delta else ("lora_A", "lora_B")
    ranks = meta["delta_ranks"] if delta else dict.fromkeys(meta["modules"], meta["rank"])
    modules = sorted(m for m in meta["modules"] if ranks.get(m, 0) > 0)
    tensors = {
        f"base_model.model.{m}.{peft_attr}.weight": state[f"{m}.{attr}"].float().contiguous()
        for m in modules
        for attr, peft_attr in zip(attrs, ("lora_A", "lora_B"), strict=True)
    }
    whole = meta.get("train_modules", [])  # trained whole: PEFT's modules_to_save
    tensors.update(
        {
            f"base_model.model.{k}": v.contiguous()
            for k, v in state.items()
            if k.rsplit(".", 1)[0] in whole
        }  # fmt: skip
    )
    if delta:  # scale 1 at every rank: alpha = r
        r = Counter(ranks[m] for m in modules).most_common(1)[0][0]
        alpha = float(r)
        rank_pattern = {m: ranks[m] for m in modules if ranks[m] != r}
        alpha_pattern = {m: float(ranks[m]) for m in rank_pattern}
    else:
        r, alpha, rank_pattern, alpha_pattern = meta["rank"], float(meta["alpha"]), {}, {}
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(meta["dropout"]),
        target_modules=modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        modules_to_save=whole or None,
        base_model_name_or_path=base,
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS))
