"""The learning-rate schedule: linear warm-up, then cosine or linear decay to zero, or constant
(with or without the warm-up).

The same functions as ``transformers.get_scheduler`` (a test compares them step by step), kept
here because importing ``transformers.optimization`` pulls in ``transformers.trainer_utils`` and,
where PEFT is installed, PEFT and bitsandbytes into every rank of every run: 0.3 s measured
(more on a loaded machine), and a bitsandbytes warning about a missing ``kernels`` module as the
first line of a LoRA run's output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0  # as transformers' "constant": no warm-up


def _constant_with_warmup(step: int, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def warmup_steps(warmup: int, ratio: float | None, total: int) -> int:
    """``train.warmup_ratio`` of the schedule's steps (rounded up, as transformers does), or
    ``train.warmup_steps`` when no ratio is set."""
    return warmup if ratio is None else math.ceil(ratio * total)


def steps_for_epochs(num_epochs: float, sequences: int, global_batch: int) -> int:
    """Optimizer steps of ``num_epochs`` passes, an epoch being what the sampler counts as one
    (``sequences // global_batch`` whole global batches)."""
    return max(1, math.ceil(num_epochs * (sequences // global_batch)))


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimizer step."""
    fn = {
        "cosine": _cosine,
        "linear": _linear,
        "constant": _constant,
        "constant_with_warmup": _constant_with_warmup,
    }[kind]
    return functools.partial(fn, warmup=warmup, total=total)


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The run's LambdaLR, with one more method: ``refresh`` re-applies the factors at the
    current step, for when a factor changed between steps (a re-warm-up that starts now),
    which ``step`` would otherwise apply one step late."""

    def refresh(self) -> None:
        lrs = [
            base * fn(self.last_epoch)
            for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)
        ]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    warmup: int,
    total: int,
    extra: Callable[[int], float] | None = None,
) -> Schedule:
    """The schedule over every parameter group; ``extra`` multiplies the factor (re-warm-ups)."""
    base = lr_factor(kind, warmup, total)
    if extra is None:
        return Schedule(optimizer, base)
    return Schedule(optimizer, lambda step: base(step) * extra(step))
