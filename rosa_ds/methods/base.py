"""What every method shares: the loop's progress, the hooks the loop calls, and the trivial
schedule (LoRA and full fine-tuning: one pass of ``train.max_steps`` optimizer steps).

The training loop knows no method. It asks the method which engine to build
(``engine_options``) and which segments of optimizer steps to run on it (``segments``), calls
the hooks around them, and after the pass asks whether another pass follows (``end_pass``).
A method that needs more overrides hooks and calls ``super()``, so that methods compose by
inheritance: the hybrid is ``class Hybrid(Subspace, Robust)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosa_ds.adapters.io import adapter_meta, gather_adapter_state, save_adapter, structure_state
from rosa_ds.config import RunConfig
from rosa_ds.engine import Built, EngineOptions
from rosa_ds.tracking import MetricsLog

TRAIN = "train"  # the main pass's phase; a method may run other phases before it


@dataclass
class Progress:
    """Where the run is: the phase, the next step, and what has been measured so far (each
    method keeps its typed state under its own keys). Checkpoints store this."""

    phase: str
    step: int
    history: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "history": self.history}


@dataclass
class Segment:
    """Optimizer steps on one engine up to step ``end``: ``name`` labels the progress bar and
    tells hooks which segment it is; ``losses`` is the history key of its loss curve;
    ``save``: periodic checkpoints may fall inside it."""

    name: str
    end: int
    losses: str = "losses"
    save: bool = True


@dataclass
class Run:
    """What the hooks see: the engine of this pass, the progress, the metrics log, and how
    many optimizer steps make an epoch of the training data."""

    built: Built
    progress: Progress
    log: MetricsLog
    steps_per_epoch: int


class Method:
    """LoRA and full fine-tuning, and the defaults every other method builds on."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.name = cfg.adapter.method_name

    # --- before a pass -----------------------------------------------------------------------
    def first_phase(self) -> str:
        return TRAIN

    def resume(self, progress: Progress, folder: Path | None) -> None:
        """Pick up what a method keeps outside the engine (``folder``: the checkpoint resumed,
        or None for a fresh run)."""

    def engine_options(self, progress: Progress) -> EngineOptions:
        return EngineOptions()

    def restore(self, run: Run, folder: Path) -> None:
        """After the engine loaded checkpoint ``folder``: restore what DeepSpeed does not."""

    # --- a pass --------------------------------------------------------------------------------
    def segments(self, progress: Progress) -> list[Segment]:
        return [Segment(progress.phase, self.cfg.train.max_steps)]

    def start_pass(self, run: Run) -> None:
        pass

    def start_segment(self, run: Run, segment: Segment) -> None:
        pass

    def after_step(self, run: Run, segment: Segment) -> None:
        """After each optimizer step (``run.progress.step`` is the number of steps done)."""

    def end_segment(self, run: Run, segment: Segment) -> None:
        pass

    def end_pass(self, run: Run) -> bool:
        """True if another pass follows (on a new engine, from ``engine_options``)."""
        return False

    # --- files ---------------------------------------------------------------------------------
    def checkpoint_extras(self, run: Run, folder: Path) -> None:
        """What a checkpoint stores besides DeepSpeed's files: by default the adapter."""
        self.write_adapter(run, folder / "adapter")

    def final_adapter(self, run: Run, folder: Path) -> None:
        """The adapter a finished run leaves in ``output_dir/adapter``."""
        self.write_adapter(run, folder)

    def write_adapter(self, run: Run, folder: Path) -> None:
        """Gather the adapter (every rank) and write it (rank 0)."""
        built = run.built
        state = gather_adapter_state(built.model, has_optimizer=True)
        state.update(structure_state(built.model, keep=built.placement.rank == 0))
        if built.placement.rank == 0:
            meta = adapter_meta(
                built.model, self.cfg.model.name_or_path, self.name, self.own_template(built)
            )
            save_adapter(folder, state, meta)

    def own_template(self, built: Built) -> str | None:
        """The chat template the run gave its tokenizer (``data.chat_template`` as a name or a
        Jinja string), for the adapter file; None when the tokenizer's own was used."""
        return (
            built.tokenizer.chat_template if isinstance(self.cfg.data.chat_template, str) else None
        )

    def summary(self, progress: Progress) -> dict[str, Any]:
        """The method's own figures for ``summary.json``."""
        return {}
