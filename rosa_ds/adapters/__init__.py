"""The one adapter module (low-rank now; sparse and resampling slot into the same layer)."""

from rosa_ds.adapters.layer import AdaptedLinear

__all__ = ["AdaptedLinear"]
