"""What a long run is judged by: tokens per second, step time, model FLOPs utilization (MFU)
and peak memory, measured per logged step and summarized for ``summary.json``.

Model FLOPs are counted from the model's own linear layers (the matmul shapes the planner also
uses: every ``nn.Linear`` and adapted layer, the head included) and its attention, per token
that is not padding, in the PaLM convention (2 FLOPs per multiply-add; attention as if not
causal; activation recomputation not counted, so it is MFU, not hardware FLOPs utilization):

- forward: ``2 * out * in`` per linear, ``2 * r * (in + out)`` for a LoRA pair, ``2 * nnz`` for
  a sparse part, and ``4 * seq * q_dim`` per layer for attention's two products;
- backward: twice the forward for what is trained (input and weight gradients), once for frozen
  weights (input gradient only), twice for attention.

The peak is ``train.peak_tflops`` or, on a GPU of the table below, its dense peak at the run's
precision; on a CPU MFU is left out unless ``train.peak_tflops`` says the peak.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil  # a DeepSpeed dependency
import torch
from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.quant.linear import QuantizedLinear

# Dense (no structured sparsity) peak TFLOP/s per GPU: name fragment -> {precision: peak}.
# Data-sheet figures; fp32 is the non-tensor-core rate (rosa-ds does not enable TF32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is lower (756 / 51)
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


def peak_flops(precision: str, override_tflops: float | None) -> float | None:
    """FLOP/s of one device at ``precision``: the override, the table, or None (unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[precision] * 1e12
    return None


@dataclass
class ModelFlops:
    """Training FLOPs per token (linears) and per token x context (attention)."""

    per_token: float
    attention_per_token_context: float

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        adapted = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
        counted = {id(m.base) for m in adapted}  # an adapted layer counts its base itself
        per_token = 0.0
        for module in adapted:
            dense = 2.0 * module.out_features * module.in_features
            per_token += dense * (3 if module.train_base else 2)  # frozen: no weight gradient
            if module.rank:
                per_token += 3 * 2.0 * module.rank * (module.in_features + module.out_features)
            per_token += 3 * 2.0 * module.mask_nnz
        for module in model.modules():
            if isinstance(module, nn.Linear | QuantizedLinear) and id(module) not in counted:
                trained = any(p.requires_grad for p in module.parameters(recurse=False))
                per_token += 2.0 * module.out_features * module.in_features * (3 if trained else 2)
        cfg = getattr(model, "config", None)
        layers = getattr(cfg, "num_hidden_layers", 0) or 0
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or (
            (getattr(cfg, "hidden_size", 0) or 0) // heads if heads else 0
        )
        attention = 3 * 4.0 * layers * heads * head_dim  # x context length, per token
        return cls(per_token, attention)

    def step(self, tokens: int, squared_lengths: int) -> float:
        """FLOPs of sequences with ``tokens`` non-pad tokens in all, ``squared_lengths`` the sum
        of their lengths squared (each token attends over its sequence)."""
        return self.per_token * tokens + self.attention_per_token_context * squared_lengths


def batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(non-pad tokens, label tokens, sum of sequence lengths squared) of a collated batch."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    labels = batch.get("labels")
    label_tokens = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
    return int(lengths.sum()), label_tokens, int((lengths.long() ** 2).sum())


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far: CUDA allocated and reserved bytes on a GPU, the
    resident set size (RSS) on a CPU."""
    if torch.cuda.is_available():
        return {
            "peak_allocated_bytes": float(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": float(torch.cuda.max_memory_reserved()),
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_rss_bytes": float(rss_kib * scale)}


def rss_now() -> float:
    """This process's resident set size now (bytes)."""
    return float(psutil.Process().memory_info().rss)


@dataclass
class StepMeter:
    """Counts one rank's tokens and FLOPs between logged steps, and keeps every logged step's
    figures for the run's medians."""

    flops: ModelFlops
    peak: float | None  # FLOP/s of one device, None if unknown
    world_size: int
    _tokens: int = 0
    _labels: int = 0
    _flops: float = 0.0
    _steps: int = 0
    _since: float = field(default_factory=time.perf_counter)
    _excluded: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        tokens, labels, squares = batch_counts(batch)
        self._tokens += tokens
        self._labels += labels
        self._flops += self.flops.step(tokens, squares)

    def step_done(self) -> None:
        self._steps += 1

    def restart(self) -> None:
        """Forget what was counted and start a new interval."""
        self._tokens = self._labels = self._steps = 0
        self._flops = self._excluded = 0.0
        self._since = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time that is no optimizer step (an evaluation, a checkpoint) is not counted."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    def local(self) -> list[float]:
        """This rank's counts since the last report, in the order ``report`` reduces them."""
        return [float(self._tokens), float(self._labels), self._flops]

    def report(self, summed: list[float], memory_max: dict[str, float]) -> dict[str, float]:
        """The figures of the steps since the last report, from the counts summed over ranks
        and the memory maximum over ranks; starts the next interval."""
        seconds = max(time.perf_counter() - self._since - self._excluded, 1e-9)
        tokens, labels, flops = summed
        out = {
            "step_seconds": seconds / max(self._steps, 1),
            "tokens_per_second": tokens / seconds,
            "label_tokens_per_second": labels / seconds,
            "tokens_per_second_per_rank": tokens / seconds / self.world_size,
            "tflops_per_rank": flops / seconds / self.world_size / 1e12,
        }
        if self.peak:
            out["mfu"] = flops / seconds / self.world_size / self.peak
        out.update(memory_max)
        for key, value in out.items():
            self.history.setdefault(key, []).append(value)
        self.restart()
        return out

    def summary(self) -> dict[str, Any]:
        """Medians of the logged steps (the first interval, with its warm-up, left out when
        there are others), and the peaks of memory."""
        out: dict[str, Any] = {}
        for key, values in self.history.items():
            if key.startswith("peak_"):
                out[key] = max(values)
            else:
                kept = values[1:] if len(values) > 1 else values
                out[f"median_{key}"] = statistics.median(kept)
        return out
