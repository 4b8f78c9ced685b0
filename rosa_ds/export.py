"""Export: a merged Hugging Face model (loads with plain ``transformers``), the adapter files,
and where the adapter has one, its PEFT form (``out/peft``, see ``adapters.peft_format``).

Runs in one process without DeepSpeed: the base model is loaded, each adapted weight gets
``W + s B A`` added in fp32, and the result is saved with ``save_pretrained`` in the base's dtype.
An adapter trained on 4-bit frozen weights is merged into ``deq(q(W))`` (rebuilt exactly), the
weights it was trained against, so the bf16 merged model computes what the 4-bit model did.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rosa_ds.adapted_model import DTYPES, load_adapted_model, merge_adapters
from rosa_ds.adapters.io import load_adapter
from rosa_ds.adapters.peft_format import peft_exportable, write_peft
from rosa_ds.config import ModelConfig
from rosa_ds.errors import UserError
from rosa_ds.model import resolve_model_path


def loadable_base(base_model: str) -> str:
    """PEFT's ``base_model_name_or_path``: a built-in's cached folder, a local folder's
    absolute path, or the hub id, so that ``AutoPeftModelForCausalLM`` finds the base."""
    try:
        return resolve_model_path(ModelConfig(name_or_path=base_model))
    except UserError:
        return base_model


def export(
    adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto"
) -> dict[str, str]:
    """Write ``out_dir/merged`` (HF model + tokenizer), copy the adapter to ``out_dir/adapter``
    and write ``out_dir/peft`` for LoRA and subspace (ROSA) adapters."""
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
    state, meta = load_adapter(adapter_out)
    if base is not None:
        meta = {**meta, "base_model": base}
    peft_dir = out / "peft"
    shutil.rmtree(peft_dir, ignore_errors=True)
    if peft_exportable(meta):
        tmp = out / ".peft.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_peft(tmp, state, meta, loadable_base(meta["base_model"]))
        if meta.get("new_special_tokens"):
            tokenizer.save_pretrained(tmp)
        tmp.rename(peft_dir)
        written["peft"] = str(peft_dir)
    return written
