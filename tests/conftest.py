"""Test session setup: caches and offline flags (see tests/helpers.py), shared fixtures."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

pytest.register_assert_rewrite("tests.method_contract")  # its shared tests' messages

import tests.helpers  # noqa: E402, F401  (sets the environment for every test and subprocess)
from tests.helpers import LORA_REFERENCE, train_ok  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rosa_ds.config import ModelConfig
    from rosa_ds.model import resolve_model_path

    return resolve_model_path(ModelConfig(name_or_path="builtin:tiny-llama"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[[str, int], tuple[Path, dict]]:
    """Uninterrupted ``LORA_REFERENCE`` runs (8 steps, checkpoints at 4 and 8), one per DeepSpeed
    config and rank count, trained once for the whole session and shared by the tests that
    compare against them (resume, elastic resume, killed saves and ranks, launchers). Copy one
    before changing it. Under pytest-xdist the workers share them through a file lock."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the base shared by every worker of this session
    root = root / "reference-runs"
    root.mkdir(exist_ok=True)

    def get(zero: str, nproc: int) -> tuple[Path, dict]:
        out = root / f"lora-{zero}-{nproc}"
        with FileLock(str(out) + ".lock"):
            if not (out / "summary.json").is_file():
                launcher = "ranks" if nproc > 1 else "python"
                args = [*LORA_REFERENCE, f"output_dir={out}", f"deepspeed.config={zero}"]
                train_ok(args, nproc=nproc, launcher=launcher)
        return out, json.loads((out / "summary.json").read_text())

    return get
