"""Metrics to ``metrics.jsonl`` (always) and to the trackers in ``train.trackers``:
TensorBoard, and Weights & Biases and MLflow through ``accelerate``'s trackers (optional
installs: ``pip install wandb`` / ``pip install mlflow-skinny``). Written by rank 0 only."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from rosa_ds.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def check_trackers(names: list[str]) -> None:
    """Every tracker asked for can be imported; else one line naming the install."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(
                f"train.trackers names {name} but the {PACKAGES[name]} package is not "
                f"installed; pip install {INSTALL[name]}, or drop {name} from train.trackers"
            )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``a.b.c`` keys with scalar values (what trackers store as params)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = (
                value
                if isinstance(value, bool | int | float | str) or value is None
                else str(value)
            )
    return out


def _accelerate_tracker(name: str, output_dir: Path, project: str, run_name: str) -> Any:
    """A started ``accelerate`` tracker; files go under ``output_dir`` unless the tracker's own
    environment (``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ...) says otherwise."""
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, WandBTracker

    PartialState()  # accelerate's logging wants it; it adopts the existing process group
    if name == "wandb":
        tracker = WandBTracker(
            project, name=run_name, dir=os.environ.get("WANDB_DIR", str(output_dir))
        )
    else:
        if "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, no server
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(experiment_name=project, run_name=run_name)
    tracker.main_process_only = False  # only rank 0 makes one; no accelerate process state
    tracker.start()
    return tracker


class MetricsLog:
    """Per-step metrics to ``metrics.jsonl`` and the configured trackers."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        trackers: list[str] | tuple[str, ...] = ("tensorboard",),
        project: str = "rosa-ds",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        out = Path(output_dir)
        self.path = out / "metrics.jsonl"
        self._tb = None
        self._trackers: list[Any] = []
        self._index = 0  # W&B wants steps that only grow; RoSA's main pass restarts at 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        for name in trackers:
            if name != "tensorboard":
                tracker = _accelerate_tracker(name, out, project, out.resolve().name)
                if config:
                    tracker.store_init_configuration(_flat(config))
                self._trackers.append(tracker)

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            k: v for k, v in values.items() if isinstance(v, int | float) and not math.isnan(v)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._trackers:
            self._index += 1
            for tracker in self._trackers:
                row = {**scalars, "train_step": step}
                if tracker.name == "wandb":  # shown at once, not when the next step arrives
                    tracker.log(row, step=self._index, commit=True)
                else:
                    tracker.log(row, step=self._index)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quiet_libraries() -> None:
    import transformers
    from deepspeed.utils import logger as ds_logger

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
