"""Modules trained whole beside the adapter (``adapter.train_modules``), and a vocabulary that
grows for ``model.new_special_tokens``.

A trained module keeps its own parameters (no wrapper), made trainable and flagged, so that the
adapter's readers (files, optimizer groups, export) find them as they find the adapter layers'
tensors: ``trained_params`` gives them by ``<module>.<parameter>`` names. A weight tied to
another (a tied ``lm_head`` is the input embedding) is one tensor, listed once.

New tokens get embedding rows at the mean of the existing ones (the same on every rank, with
no noise), for the input embeddings and an untied output head alike.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rosa_ds.errors import UserError
from rosa_ds.targets import matches
from rosa_ds.zero_params import gathered

FLAG = "_rosa_ds_trained"
NEW_TOKENS = "_rosa_ds_new_tokens"  # the tokens a model's vocabulary grew by, for adapter.json


def mark_trained_modules(model: nn.Module, patterns: list[str], adapted: list[str]) -> list[str]:
    """Flag the modules ``patterns`` select and make their own parameters trainable; returns
    their names. ``adapted``: the adapter's targets, which cannot be trained whole too."""
    if not patterns:
        return []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(
                f"adapter.train_modules pattern {pattern!r} is not a regex: {exc}"
            ) from None
    names = []
    for name, module in model.named_modules():
        if not name or not any(matches(name, p) for p in patterns):
            continue
        if name in adapted or any(name.startswith(a + ".") for a in adapted):
            raise UserError(
                f"adapter.train_modules selects {name}, which adapter.targets adapts; "
                "drop it from one of them"
            )
        if getattr(module, "quantized", False) or type(module).__name__ == "QuantizedLinear":
            raise UserError(
                f"adapter.train_modules selects {name}, whose weight is 4-bit; exclude it "
                "from quantization (quant.all_linear=false) or from adapter.train_modules"
            )
        params = list(module.parameters(recurse=False))
        if not params:
            raise UserError(
                f"adapter.train_modules selects {name}, which holds no parameters of its own; "
                "name the leaf modules (e.g. embed_tokens, lm_head, norm)"
            )
        setattr(module, FLAG, True)
        for p in params:
            p.requires_grad_(True)
        names.append(name)
    if not names:
        leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if n and list(m.parameters(recurse=False))})  # fmt: skip
        raise UserError(
            f"adapter.train_modules {patterns} matched no module; this model's modules with "
            f"parameters end in: {', '.join(leaves[:10])}"
        )
    return names


def trained_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, FLAG, False)]


def trained_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``<module>.<parameter>`` -> parameter of every trained module, each tensor once."""
    seen: set[int] = set()
    out = {}
    for name in trained_module_names(model):
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{name}.{pname}"] = p
    return out


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], names: list[str]) -> None:
    """Copy the trained modules' tensors of an adapter file into a (plain) model."""
    for name in names:
        module = model.get_submodule(name)
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}"
            if key not in state:
                continue  # a tied weight, stored under the module that came first
            if tuple(p.shape) != tuple(state[key].shape):
                raise UserError(
                    f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model "
                    f"{tuple(p.shape)}; use the base model (and new tokens) it was trained with"
                )
            with torch.no_grad():
                p.copy_(state[key].to(p.dtype))


def grow_vocabulary(model: nn.Module, size: int, tokens: list[str]) -> None:
    """Resize the embeddings to ``size`` rows (the tokenizer with ``tokens`` added), the new rows
    at the mean of the old; under ZeRO-3 the partitioned weights are gathered for it."""
    weight = model.get_input_embeddings().weight
    old = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the shape aside
    setattr(model, NEW_TOKENS, list(tokens))
    if size <= old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    with gathered(weights, modifier_rank=0), torch.no_grad():
        for w in weights:
            w[old:] = w[:old].float().mean(0).to(w.dtype)
