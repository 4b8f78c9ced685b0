"""One class per method, behind the hooks the training loop calls (``base.Method``).

Adding a method: a subclass of ``Method`` (or of another method) that overrides the hooks it
needs, a row in ``METHOD_CLASSES``, its name in ``rosa_ds.config.METHODS``, and a row in the
method contract table (``tests/test_methods.py``).
"""

from __future__ import annotations

from pathlib import Path

from rosa_ds.config import RunConfig
from rosa_ds.methods.base import Method, Progress, Run, Segment
from rosa_ds.methods.robust import Robust
from rosa_ds.methods.subspace import Subspace


class Hybrid(Subspace, Robust):
    """RoSA's masks from a warm-up pass, then ROSA's resampling in the main pass."""


METHOD_CLASSES: dict[str, type[Method]] = {
    "lora": Method,
    "full": Method,
    "sparse": Robust,
    "robust": Robust,
    "subspace": Subspace,
    "hybrid": Hybrid,
}


def build_method(cfg: RunConfig, out: Path) -> Method:
    return METHOD_CLASSES[cfg.adapter.method_name](cfg, out)


__all__ = ["Method", "Progress", "Run", "Segment", "build_method", "METHOD_CLASSES"]
