"""Choose the target modules by name pattern and swap each for an :class:`AdaptedLinear`."""

from __future__ import annotations

import re

import torch
from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.config import AdapterConfig
from rosa_ds.errors import UserError
from rosa_ds.quant.linear import QuantizedLinear

ALL_LINEAR = "all-linear"


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches the end of the dotted name at a dot boundary (``q_proj``, ``mlp\\..*``)."""
    return re.search(rf"(^|\.)(?:{pattern})$", name) is not None


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the linear modules that ``cfg.targets`` selects and ``cfg.exclude`` does not."""
    kinds = (nn.Linear, QuantizedLinear)  # a 4-bit layer is targeted like the layer it replaced
    linear = [n for n, m in model.named_modules() if isinstance(m, kinds) and n]
    for pattern in cfg.targets + cfg.exclude:
        if pattern == ALL_LINEAR:
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"adapter pattern {pattern!r} is not a valid regex: {exc}") from None
    chosen = [
        n
        for n in linear
        if any(p == ALL_LINEAR or _matches(n, p) for p in cfg.targets)
        and not any(_matches(n, p) for p in cfg.exclude)
    ]
    if not chosen:
        examples = ", ".join(sorted({n.split(".")[-1] for n in linear})[:8])
        raise UserError(
            f"adapter.targets {cfg.targets} matched no linear module (minus exclude "
            f"{cfg.exclude}); this model's linear layers end in: {examples}"
        )
    return chosen


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze the model and wrap every target in an adapter; returns the adapted module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_targets(model, cfg)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, AdaptedLinear(base, cfg.rank, cfg.alpha, cfg.dropout))
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
