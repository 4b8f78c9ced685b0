"""Start-up cost every rank pays before its first step, kept off where rosa-ds does not need it.

``import deepspeed`` imports its autotuner, which imports ``mlflow`` whenever it is installed
(the ``[trackers]`` extra): 1.3 s per rank here, more where site-packages sit on a shared file
system, for a feature (``deepspeed --autotuning``) rosa-ds never runs. The autotuner alone is
shown mlflow as absent; every other importer, ``train.trackers: [mlflow]`` included, gets it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

AUTOTUNER = "deepspeed.autotuning.autotuner"


class _LoaderWithoutMlflow(importlib.abc.Loader):
    """Runs the autotuner's module code while ``import mlflow`` fails, then undoes that."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if "mlflow" in sys.modules:  # already imported by someone who wanted it: nothing to save
            self.loader.exec_module(module)
            return
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError
        try:
            self.loader.exec_module(module)
        finally:
            del sys.modules["mlflow"]


class _AutotunerFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != AUTOTUNER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithoutMlflow(spec.loader)
        return spec


def hide_mlflow_from_deepspeed_autotuner() -> None:
    """Install the finder once, ahead of the standard ones (idempotent)."""
    if not any(isinstance(f, _AutotunerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutotunerFinder())
