"""Build a model whose frozen linear weights are 4-bit, without ever holding it whole in bf16.

Which layers: the adapted ones (``adapter.targets`` minus ``adapter.exclude``), and with
``quant.all_linear`` every other linear layer too, except the output head (and any layer whose
weight is tied to another parameter).

How, by ZeRO stage:

- ZeRO-3: ``from_pretrained`` builds the model partitioned (``HfDeepSpeedConfig``); then one
  layer at a time its weight is gathered, quantized (every rank computes the same records),
  and the new ``uint8`` parameter is partitioned at once. Peak: the partitioned model plus one
  full matrix.
- ZeRO-0/1/2 and one process: the model skeleton is made with empty (meta) parameters; each
  quantized layer's weight is read alone from the safetensors checkpoint and quantized, the
  other parameters (embeddings, norms, head) are read as they are. Peak: the non-quantized
  parameters plus one full matrix. A checkpoint that is not safetensors falls back to
  ``from_pretrained`` followed by quantization (then the model is whole once, and a warning
  says so).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rosa_ds.config import AdapterConfig, ModelConfig, QuantConfig
from rosa_ds.dist import rank_world
from rosa_ds.quant.linear import QuantizedLinear, quantized_layers
from rosa_ds.targets import find_targets
from rosa_ds.weight_files import tensor_files
from rosa_ds.zero_params import gathered, is_partitioned

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(quant: QuantConfig, train_dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to: ``quant.compute_dtype``, or the training one."""
    return train_dtype if quant.compute_dtype == "auto" else DTYPES[quant.compute_dtype]


def quant_targets(model: nn.Module, adapter: AdapterConfig, quant: QuantConfig) -> list[str]:
    """Names of the linear layers to quantize (sorted, the same on every rank)."""
    names = set(find_targets(model, adapter.targets, adapter.exclude, (nn.Linear,)))
    if quant.all_linear:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name and module is not head:
                names.add(name)
    # a weight shared with another module (tied embeddings) stays as it is
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return sorted(n for n in names if counts[id(model.get_submodule(n).weight)] == 1)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _make(weight, bias, quant: QuantConfig, cdtype: torch.dtype) -> QuantizedLinear:
    return QuantizedLinear.from_weight(
        weight,
        bias,
        quant_type=quant.type,
        block_size=quant.block_size,
        double_quant=quant.double_quant,
        compute_dtype=cdtype,
    )


def quantize_model(
    model: nn.Module, names: list[str], quant: QuantConfig, cdtype: torch.dtype
) -> None:
    """Replace each named ``nn.Linear`` by a ``QuantizedLinear``, one at a time; under ZeRO-3
    (partitioned parameters) every rank calls this, each layer is gathered, quantized and the
    records partitioned at once."""
    for name in names:
        lin = model.get_submodule(name)
        params = [p for p in (lin.weight, lin.bias) if p is not None]
        if is_partitioned(lin.weight):
            with gathered(params):
                q = _make(lin.weight.data, lin.bias, quant, cdtype)
            new = [p for p in q.parameters(recurse=False)]
            lin.weight.convert_to_zero_parameters(param_list=new)  # partition at once
        else:
            q = _make(lin.weight.data, lin.bias, quant, cdtype)
        q.train(lin.training)
        _swap(model, name, q)


def load_streaming(
    path: str | Path,
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    quant: QuantConfig,
    adapter: AdapterConfig,
) -> nn.Module | None:
    """The model built from its skeleton one tensor at a time, the targets quantized as they
    are read; None if ``path`` is not a local safetensors checkpoint with matching names."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    files = tensor_files(path)
    if files is None:
        return None
    cdtype = compute_dtype(quant, dtype)

    config = AutoConfig.from_pretrained(
        str(path), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            **model_cfg.load_kwargs(),
        )
    names = quant_targets(model, adapter, quant)
    handles: dict[Path, Any] = {}

    def read(key: str) -> torch.Tensor | None:
        file = files.get(key)
        if file is None:
            return None
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(key)

    def weight(key: str, like: torch.Tensor) -> torch.Tensor | None:
        t = read(key)
        if t is None:
            return None
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)}, model {tuple(like.shape)}")
        return t.to(like.dtype)

    for name in names:
        lin = model.get_submodule(name)
        w = weight(f"{name}.weight", lin.weight)
        b = weight(f"{name}.bias", lin.bias) if lin.bias is not None else None
        if w is None or (lin.bias is not None and b is None):
            return None  # names do not match the checkpoint: let from_pretrained map them
        _swap(model, name, _make(w, b, quant, cdtype))
        del w, b
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for module_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            key = f"{module_name}.{pname}" if module_name else pname
            t = weight(key, p)
            if t is None:
                if key in tied:
                    continue  # filled by tie_weights below
                return None
            module._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
    handles.clear()
    model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    with contextlib.suppress(OSError):  # a model folder without generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.eval()  # as from_pretrained leaves it
    return model


def frozen_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of quantized records: this rank's share and the whole (they differ under ZeRO-3),
    the packed/scale split of this rank's share, and the parameters they stand for."""
    local = total = params = packed = scales = 0
    for m in quantized_layers(model).values():
        q = m.qweight
        total += m.spec.nbytes
        params += m.spec.numel
        if hasattr(q, "ds_tensor"):
            part = q.ds_tensor.numel()
            start = _partition_start(q)
            comp = m.spec.component_bytes(start, start + part)
            local += min(part, max(0, m.spec.nbytes - start))
        else:
            comp = m.spec.component_bytes()
            local += m.spec.nbytes
        packed += comp["packed"]
        scales += comp["scales"]
    return {
        "local": local,
        "total": total,
        "params": params,
        "local_packed": packed,
        "local_scales": scales,
    }


def _partition_start(p: torch.Tensor) -> int:
    """Where this rank's ZeRO-3 partition of ``p`` starts in the flat tensor."""
    return rank_world()[0] * p.ds_tensor.ds_numel
