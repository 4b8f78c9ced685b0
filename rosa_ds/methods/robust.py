"""Robust adaptation (RoSA, and SpA without the low-rank part): a warm-up pass chooses the masks.

The warm-up pass trains LoRA alone for ``mask_warmup_steps`` (a throw-away LoRA of
``warmup_rank`` for sparse-only runs), then ``mask_grad_steps`` steps during which the frozen
weights' gradients are collected (``GradientCollector``), then the masks are chosen. The main
pass runs on a new engine with the masks attached, from step 0 with a fresh LoRA
(``after_mask=restart``, the reference) or from where the warm-up left it (``continue``).
Masks given by ``adapter.robust.mask_file`` skip the warm-up.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rosa_ds.adapters.io import gather_adapter_state
from rosa_ds.adapters.masks import GradientCollector, load_masks, save_masks
from rosa_ds.checkpoint import MASK_FILE
from rosa_ds.engine import EngineOptions
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.methods.base import TRAIN, Method, Progress, Run, Segment

WARMUP = "warmup"  # the phase of the warm-up pass
COLLECT = "collect"  # the segment whose gradients choose the masks


@dataclass
class RobustState:
    """What the mask phase measured (kept in the progress history, so in checkpoints)."""

    mask_nnz: int | None = None
    accumulator_bytes: dict[str, int] | None = None
    mask_seconds: float | None = None  # the collection steps and the selection, wall time

    @classmethod
    def load(cls, history: dict[str, Any]) -> RobustState:
        return cls(
            history.get("mask_nnz"), history.get("accumulator_bytes"), history.get("mask_seconds")
        )

    def store(self, history: dict[str, Any]) -> None:
        history.update(asdict(self))


class Robust(Method):
    """Low-rank plus sparse (or sparse only); the masks come from accumulated gradients."""

    def __init__(self, cfg, out: Path) -> None:
        super().__init__(cfg, out)
        self.robust = cfg.adapter.robust
        self.masks: dict[str, SparseStructure] | None = None
        self.collector: GradientCollector | None = None
        self.collect_start = 0.0  # when the collection segment began (perf_counter)
        self.carry: dict[str, torch.Tensor] | None = None  # the warm-up's LoRA (continue)
        self.carry_step = 0

    def first_phase(self) -> str:
        return TRAIN if self.robust.mask_file else WARMUP

    def resume(self, progress: Progress, folder: Path | None) -> None:
        super().resume(progress, folder)
        if folder is not None and (folder / MASK_FILE).is_file():
            self.masks = load_masks(folder / MASK_FILE)
        elif self.robust.mask_file:
            self.masks = load_masks(self.robust.mask_file)

    def engine_options(self, progress: Progress) -> EngineOptions:
        opts = super().engine_options(progress)
        if progress.phase == WARMUP:
            if self.cfg.adapter.rank == 0:  # sparse-only: a throw-away LoRA for the warm-up
                opts.rank = self.robust.warmup_rank
            # a warm-up longer than a restarted main pass must not run past its schedule's end
            warm = self.robust.mask_warmup_steps + self.robust.mask_grad_steps
            opts.schedule_steps = max(self.cfg.train.max_steps, warm)
            return opts
        opts.masks = self.masks
        if self.carry is not None:
            opts.adapter_state, opts.start_step = self.carry, self.carry_step
        return opts

    def start_pass(self, run: Run) -> None:
        super().start_pass(run)
        if run.progress.phase != WARMUP:
            # The layers hold the masks now (under ZeRO-3 each rank its partition of them);
            # checkpoints read them from there, so no rank keeps a whole copy for the run.
            self.masks = None

    def segments(self, progress: Progress) -> list[Segment]:
        if progress.phase != WARMUP:
            return super().segments(progress)
        warm_end = self.robust.mask_warmup_steps
        return [
            Segment("warm-up", warm_end, losses="warmup_losses"),
            Segment(COLLECT, warm_end + self.robust.mask_grad_steps, "warmup_losses", save=False),
        ]

    def start_segment(self, run: Run, segment: Segment) -> None:
        super().start_segment(run, segment)
        if segment.name == COLLECT:
            gas = float(run.built.engine.gradient_accumulation_steps())
            self.collector = GradientCollector(run.built.model, self.cfg.adapter, grad_scale=gas)
            self.collector.start()
            self.collect_start = time.perf_counter()

    def after_step(self, run: Run, segment: Segment) -> None:
        super().after_step(run, segment)
        if segment.name == COLLECT:
            t = self.cfg.train  # every micro-batch of the global batch, over all ranks
            self.collector.count_micro_batch(t.global_batch_size // t.micro_batch_size)

    def end_segment(self, run: Run, segment: Segment) -> None:
        super().end_segment(run, segment)
        if segment.name == COLLECT:
            self.select_masks(run)

    def select_masks(self, run: Run) -> None:
        collector, self.collector = self.collector, None
        collector.stop()
        self.masks = collector.select(self.cfg.adapter)
        state = RobustState(
            sum(m.nnz for m in self.masks.values()),
            {"local": collector.local_bytes(), "dense": collector.dense_bytes()},
            round(time.perf_counter() - self.collect_start, 4),
        )
        state.store(run.progress.history)
        if run.built.placement.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_masks(self.out / MASK_FILE, self.masks)
        run.log.log(
            run.progress.step,
            phase="mask",
            mask_nnz=state.mask_nnz,
            accumulator_bytes_local=collector.local_bytes(),
        )

    def end_pass(self, run: Run) -> bool:
        if run.progress.phase != WARMUP:
            return super().end_pass(run)
        progress = run.progress
        if self.robust.after_mask == "restart":
            self.carry, progress.step = None, 0
        else:
            self.carry = gather_adapter_state(run.built.model, has_optimizer=True)
            self.carry_step = progress.step
        progress.phase = TRAIN
        return True

    def summary(self, progress: Progress) -> dict[str, Any]:
        state = RobustState.load(progress.history)
        return super().summary(progress) | {
            "mask_nnz": state.mask_nnz,
            "accumulator_bytes": state.accumulator_bytes,
            "mask_seconds": state.mask_seconds,
            "warmup_losses": progress.history.get("warmup_losses", []),
        }
