"""Faults injected on purpose, so tests can prove that crashes and bad numbers lose no work.

``ROSA_DS_FAULT`` holds comma-separated ``<fault>@<step>`` items (``@3-5`` for a range of steps;
step N is the N-th optimizer step of the pass, counted from 1):

    save:<point>@N    exit at a named point of the save of step N (see ``checkpoint.SAVE_POINTS``)
    kill:rank<R>@N    rank R kills itself with SIGKILL after optimizer step N
    signal:rank<R>@N  rank R sends itself SIGTERM during optimizer step N (after its first
                      micro-batch's backward), as a scheduler's preemption would
    slow@N            optimizer step N takes half a second longer (room to signal a live run)
    nan_loss@N        the loss of step N becomes NaN (and so do its gradients)
    nan_grad@N        one adapter gradient of step N becomes NaN; the loss stays finite

Unset, every check is one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import torch

FAULT_ENV = "ROSA_DS_FAULT"


def _items() -> list[tuple[str, int, int]]:
    spec = os.environ.get(FAULT_ENV, "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.rpartition("@")
        first, _, last = steps.partition("-")
        out.append((name, int(first), int(last or first)))
    return out


def active(name: str, step: int) -> bool:
    """Is fault ``name`` set for ``step``?"""
    return any(n == name and lo <= step <= hi for n, lo, hi in _items())


def exit_if(name: str, step: int) -> None:
    """Leave at once, as a kill would: no cleanup, no exception handlers."""
    if active(name, step):
        os._exit(17)


def kill_if(rank: int, step: int) -> None:
    if active(f"kill:rank{rank}", step):
        os.kill(os.getpid(), signal.SIGKILL)


def signal_if(rank: int, step: int) -> None:
    if active(f"signal:rank{rank}", step):
        os.kill(os.getpid(), signal.SIGTERM)


def slow_if(step: int) -> None:
    if active("slow", step):
        time.sleep(0.5)


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if active("nan_loss", step) else loss


@contextlib.contextmanager
def corrupt_gradient(model: torch.nn.Module, step: int) -> Iterator[None]:
    """Make the gradient of the first trainable parameter NaN during this block."""
    if not active("nan_grad", step):
        yield
        return
    param = next(p for p in model.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))
    try:
        yield
    finally:
        handle.remove()
