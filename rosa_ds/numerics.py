"""Numerical trouble: a step with a non-finite loss or gradient is skipped, too many in a row
stop the run, and an adapter holding NaN or Inf is never written to a checkpoint.

The skip itself is DeepSpeed's: its ZeRO optimizers compute the global gradient norm at every
step and, when it is not finite, discard the step (no update, schedule not advanced) in fp32 and
bf16 alike; ``engine.was_step_applied()`` reports it, identically on every rank. This module
counts those skips (and non-finite losses) and decides when to give up.
"""

from __future__ import annotations

import math

import torch

from rosa_ds.dist import all_reduce_sum
from rosa_ds.errors import TrainingError
from rosa_ds.zero_params import local_tensor


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; too many in a row
    stop the run."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0
        self.skipped: list[int] = []

    def check(self, step: int, loss: float, applied: bool) -> bool:
        """Record optimizer step ``step``; True if it was skipped. Raises after too many."""
        if math.isfinite(loss) and applied:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped.append(step)
        if self.in_a_row > self.max_bad_steps:
            raise TrainingError(
                f"non-finite loss or gradient in {self.in_a_row} optimizer step(s) in a row "
                f"(the last at step {step}); lower train.lr or check the data, raise "
                "train.max_bad_steps to tolerate more, and continue from the last checkpoint "
                "with --resume"
            )
        return True


def nonfinite_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters holding NaN or Inf, counted over all ranks (each checks what it
    holds: its partition under ZeRO-3, the full tensor otherwise)."""
    bad = 0
    for p in model.parameters():
        if p.requires_grad:
            local = local_tensor(p)
            bad += int(not bool(torch.isfinite(local).all()))
    (total,) = all_reduce_sum([float(bad)])
    return int(total)
