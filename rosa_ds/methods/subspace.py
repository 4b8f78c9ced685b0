"""Subspace adaptation (ROSA): every ``resample_every`` steps (or epochs) the low-rank adapter
is merged into the frozen weight, the merged weight factorized, and a random subset of its
singular vectors becomes the new adapter; the factors' Adam state is reset, and an optional
re-warm-up (ReLoRA) restarts the learning rate. After the first resample the frozen weights
are no longer the base model's, so checkpoints carry them and the final adapter is the
accumulated update (``adapters/subspace_io.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rosa_ds.adapters.resample import resample_all
from rosa_ds.adapters.subspace_io import (
    frozen_files,
    read_frozen_weights,
    write_frozen_shards,
    write_subspace_adapter,
)
from rosa_ds.engine import EngineOptions
from rosa_ds.methods.base import TRAIN, Method, Progress, Run, Segment
from rosa_ds.zero_params import reset_optimizer_group

HISTORY_KEY = "resample"


class ReWarm:
    """A linear learning-rate re-warm-up after each resample, on top of the schedule (ReLoRA)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.since = -(10**9)  # the step of the last resample

    def factor(self, step: int) -> float:
        """1/steps at the resample, then 2/steps, ... up to 1 after ``steps`` steps."""
        if self.steps <= 0 or step - self.since >= self.steps:
            return 1.0
        return (max(step - self.since, 0) + 1) / self.steps


@dataclass
class SubspaceState:
    """Every resample so far (kept in the progress history, so in checkpoints)."""

    count: int = 0
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    indices: dict[str, list[int]] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)
    requant: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def load(cls, history: dict[str, Any]) -> SubspaceState:
        return cls(**history.get(HISTORY_KEY, {}))

    def store(self, history: dict[str, Any]) -> None:
        history[HISTORY_KEY] = asdict(self)


class Subspace(Method):
    """Resampled low-rank adaptation; composes with robust adaptation (the hybrid)."""

    def __init__(self, cfg, out: Path) -> None:
        super().__init__(cfg, out)
        self.sub = cfg.adapter.subspace
        self.rewarm = ReWarm(self.sub.rewarm_steps) if self.sub.rewarm_steps else None

    def engine_options(self, progress: Progress) -> EngineOptions:
        opts = super().engine_options(progress)
        if self.rewarm is not None and progress.phase == TRAIN:
            opts.lr_factor = self.rewarm.factor
        return opts

    def restore(self, run: Run, folder: Path) -> None:
        super().restore(run, folder)
        state = SubspaceState.load(run.progress.history)
        if self.rewarm is not None and state.steps:
            self.rewarm.since = state.steps[-1]
            run.built.engine.lr_scheduler.refresh()
        if frozen_files(folder):
            read_frozen_weights(run.built.model, folder)

    def start_pass(self, run: Run) -> None:
        super().start_pass(run)
        p = run.progress
        if p.phase == TRAIN and self.sub.at_start and p.step == 0 and not self.resampled(p):
            self.resample(run)  # the reference factorizes at construction

    def after_step(self, run: Run, segment: Segment) -> None:
        super().after_step(run, segment)
        p = run.progress
        if p.phase != TRAIN or p.step >= segment.end:
            return
        unit = run.steps_per_epoch if self.sub.unit == "epochs" else 1
        if p.step % (self.cfg.adapter.resample_every * unit) == 0:
            self.resample(run)

    @staticmethod
    def resampled(progress: Progress) -> bool:
        """Have the frozen weights been rewritten (so checkpoints must carry them)?"""
        return SubspaceState.load(progress.history).count > 0

    def resample(self, run: Run) -> None:
        """Merge, factorize and resample every low-rank adapter; reset the factors' Adam state."""
        built, progress = run.built, run.progress
        state = SubspaceState.load(progress.history)
        report = resample_all(
            built.model,
            sampling=self.sub.sampling,
            split=self.sub.split,
            seed=self.cfg.seed,
            count=state.count,
            has_optimizer=True,
        )
        reset_optimizer_group(built.engine, built.group_index("lowrank"))
        if self.rewarm is not None:
            self.rewarm.since = progress.step
            built.engine.lr_scheduler.refresh()
        state.count += 1
        state.steps.append(progress.step)
        state.seconds.append(round(report.seconds, 4))
        state.indices, state.owners = report.indices, report.owners
        requant = report.requant_summary()  # 4-bit frozen weights: the re-quantization error
        if requant is not None:
            state.requant.append(requant)
        state.store(progress.history)
        run.log.log(
            progress.step,
            phase="resample",
            resample_count=state.count,
            resample_seconds=report.seconds,
            **{f"requant_{k}": v for k, v in (requant or {}).items()},
        )

    def checkpoint_extras(self, run: Run, folder: Path) -> None:
        if self.resampled(run.progress):  # W_fixed is not the base model's weight any more
            write_frozen_shards(run.built.model, folder)
        else:
            super().checkpoint_extras(run, folder)

    def final_adapter(self, run: Run, folder: Path) -> None:
        if not self.resampled(run.progress):
            super().final_adapter(run, folder)
            return
        count = SubspaceState.load(run.progress.history).count
        write_subspace_adapter(
            run.built.model,
            run.built.model_path,
            self.cfg.model.name_or_path,
            self.name,
            folder,
            count,
            self.own_template(run.built),
        )

    def summary(self, progress: Progress) -> dict[str, Any]:
        state = SubspaceState.load(progress.history) if self.resampled(progress) else None
        return super().summary(progress) | {
            "requant_errors": state.requant or None if state else None,
            "resamples": state.count if state else 0,
            "resample_seconds": state.seconds if state else [],
        }
