"""Which modules a name pattern selects: the one matching rule for adapter targets, exclusions,
per-module densities, modules trained whole, quantization and the planner."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rosa_ds.errors import UserError

if TYPE_CHECKING:  # torch-free at run time: the planner matches patterns too
    from torch import nn

ALL_LINEAR = "all-linear"


def matches(name: str, pattern: str) -> bool:
    """A pattern matches the end of the dotted name at a dot boundary (``q_proj``, ``mlp\\..*``)."""
    return re.search(rf"(^|\.)(?:{pattern})$", name) is not None


def first_match(name: str, patterns: dict[str, float], default: float) -> float:
    """The value of the first pattern that matches ``name`` (insertion order), else ``default``."""
    for pattern, value in patterns.items():
        if matches(name, pattern):
            return value
    return default


def find_targets(
    model: nn.Module, targets: list[str], exclude: list[str], kinds: tuple[type, ...]
) -> list[str]:
    """Names of the modules of ``kinds`` that ``targets`` selects and ``exclude`` does not."""
    linear = [n for n, m in model.named_modules() if isinstance(m, kinds) and n]
    for pattern in targets + exclude:
        if pattern == ALL_LINEAR:
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"adapter pattern {pattern!r} is not a valid regex: {exc}") from None
    chosen = [
        n
        for n in linear
        if any(p == ALL_LINEAR or matches(n, p) for p in targets)
        and not any(matches(n, p) for p in exclude)
    ]
    if not chosen:
        examples = ", ".join(sorted({n.split(".")[-1] for n in linear})[:8])
        raise UserError(
            f"adapter.targets {targets} matched no linear module (minus exclude "
            f"{exclude}); this model's linear layers end in: {examples}"
        )
    return chosen
