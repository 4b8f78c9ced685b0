"""Choose the target modules by name pattern and swap each for an :class:`AdaptedLinear`."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.adapters.trained_modules import mark_trained_modules
from rosa_ds.config import AdapterConfig
from rosa_ds.quant.linear import QuantizedLinear
from rosa_ds.targets import find_targets as _find

# a 4-bit layer is targeted like the layer it replaced
LINEAR_KINDS = (nn.Linear, QuantizedLinear)


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the linear modules that ``cfg.targets`` selects and ``cfg.exclude`` does not."""
    return _find(model, cfg.targets, cfg.exclude, LINEAR_KINDS)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze the model, wrap every target in an adapter and make ``adapter.train_modules``
    trainable whole; returns the adapted module names.

    Full fine-tuning (``adapter.method=full``) wraps the targets too, with no low-rank or sparse
    part and their own weight trainable, so that every method has the same layer contract."""
    for p in model.parameters():
        p.requires_grad_(False)
    full = cfg.method_name == "full"
    names = find_targets(model, cfg)
    mark_trained_modules(model, cfg.train_modules, names)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        rank = 0 if full else cfg.rank
        layer = AdaptedLinear(base, rank, cfg.alpha, cfg.dropout, train_base=full)
        layer.shares_weight = uses[id(getattr(base, "weight", None))] > 1
        setattr(parent, child, layer)
    return names


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def place_adapters(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move the adapters' parameters and mask buffers to ``device``, floating ones to ``dtype``.

    DeepSpeed ZeRO-3 neither moves nor casts a model built under ``zero.Init`` (it takes both
    as done), so the adapters created afterwards would stay fp32 on the CPU, masks included.
    ZeRO-1/2 cast and move the whole module in ``deepspeed.initialize``; this does the same for
    the adapters alone, leaving the partitioned base weights as they are.
    """
    for module in adapted_modules(model).values():
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device, dtype if p.is_floating_point() else p.dtype)
        for b in module.buffers(recurse=False):
            b.data = b.data.to(device)


def register_frozen_reads(model: nn.Module) -> None:
    """Under ZeRO-3, let DeepSpeed gather a base weight for its adapter's own forward too (the
    sparse-add path reads it there, outside the base module)."""
    import deepspeed

    for module in adapted_modules(model).values():
        if module.reads_frozen_in_forward:
            for p in module.base.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(module, p)
