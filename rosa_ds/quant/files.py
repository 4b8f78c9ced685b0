"""4-bit weights in files: what adapter metadata records, how checkpoints keep rewritten records,
and how export rebuilds the frozen weights that training used.

Quantization is deterministic, so the records of a layer that was never rewritten are rebuilt
exactly from the base model (the same dtype, the same spec): checkpoints store records only
after ROSA resampling has rewritten them (``frozen.safetensors``, as ``<module>.qweight`` with
the spec in the metadata). Export merges into ``deq(q(W_0))``, the weight the adapter was
trained against, so the merged bf16 model computes what the 4-bit model computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rosa_ds.quant.linear import quantized_layers
from rosa_ds.quant.nf4 import QuantSpec, dequantize, quantize
from rosa_ds.weight_files import tensor_files

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def quant_meta(model: nn.Module) -> dict[str, Any]:
    """``{"quant": {...}}`` for adapter.json when the model has 4-bit layers, else ``{}``."""
    layers = quantized_layers(model)
    if not layers:
        return {}
    first = next(iter(layers.values()))
    return {
        "quant": {
            "bits": 4,
            "type": first.spec.quant_type,
            "block_size": first.spec.block_size,
            "double_quant": first.spec.double_quant,
            "source_dtype": DTYPE_NAMES[first.source_dtype],
            "modules": sorted(layers),
        }
    }


def roundtrip(w: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """``deq(q(w))`` in fp32, quantized from ``info["source_dtype"]`` as training did."""
    spec = QuantSpec(tuple(w.shape), info["type"], int(info["block_size"]), info["double_quant"])
    src = w.to(NAME_DTYPES[info["source_dtype"]])
    return dequantize(quantize(src, spec), spec, torch.float32)


def rebuild_trained_base(model: nn.Module, info: dict[str, Any], model_path: str) -> None:
    """Replace each quantized layer's weight of a plain (bf16/fp32) model by ``deq(q(W_0))``,
    ``W_0`` read from the base checkpoint in the dtype training quantized."""
    files = tensor_files(model_path) or {}
    for name in info["modules"]:
        weight = model.get_submodule(name).weight
        key = f"{name}.weight"
        if key in files:
            with safe_open(str(files[key]), framework="pt") as f:
                w0 = f.get_tensor(key)
        else:  # not a local safetensors checkpoint: the weight as loaded
            w0 = weight.detach()
        with torch.no_grad():
            weight.copy_(roundtrip(w0, info).to(weight.dtype))


def frozen_file_shapes(path: str | Path) -> dict[str, tuple[int, int]]:
    """The matrix shapes of the 4-bit records in a checkpoint's frozen-weight file."""
    with safe_open(str(path), framework="pt") as f:
        specs = json.loads((f.metadata() or {}).get("quant_specs", "{}"))
    return {name: tuple(spec["shape"]) for name, spec in specs.items()}
