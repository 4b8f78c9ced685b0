"""Choose the target modules by name pattern and swap each for an :class:`AdaptedLinear`."""

from __future__ import annotations

import re

from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.config import AdapterConfig
from rosa_ds.errors import UserError

ALL_LINEAR = "all-linear"


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches the end of the dotted name at a dot boundary (``q_proj``, ``mlp\\..*``)."""
    return re.search(rf"(^|\.)(?:{pattern})$", name) is not None


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the linear modules that ``cfg.targets`` selects and ``cfg.exclude`` does not."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
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
