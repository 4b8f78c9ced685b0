"""One interface to a frozen weight, whatever stores it: a plain ``nn.Linear`` or 4-bit records.

Adapters, resampling and checkpoints never ask which kind they hold: they read the full weight
(fp32), write a new one that one rank computed, and save or restore what the weight is stored
as. ``frozen_weight(module)`` gives the interface of any frozen linear layer; a 4-bit
``QuantizedLinear`` implements it itself, a plain ``nn.Linear`` gets ``DenseFrozen``.
Every method that reads or writes is a collective (every rank calls it).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from rosa_ds.errors import UserError
from rosa_ds.kernels.sparse_linear import release_merge
from rosa_ds.quant.nf4 import QuantSpec, dequantize
from rosa_ds.zero_params import read_full, write_from_owner


class FrozenWeight(abc.ABC):
    """What a frozen weight offers: its shape and device, full reads and writes, and its stored
    form (what a checkpoint keeps after resampling rewrote it)."""

    shape: tuple[int, int]
    lossy: bool = False  # does write_full round the value (and return the error)?

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def read_full(self, keep: bool) -> torch.Tensor | None:
        """The full weight in fp32 on the CPU, on ranks with ``keep``."""

    @abc.abstractmethod
    def write_full(self, value: torch.Tensor | None, owner: int) -> Any:
        """Store a new weight that only ``owner`` holds; returns what storing lost (the
        re-quantization error of 4-bit records, on ``owner``), or None."""

    @abc.abstractmethod
    def read_stored(self, keep: bool) -> torch.Tensor | None:
        """The stored tensor (the weight in its dtype, or 4-bit records), on ranks with ``keep``."""

    @abc.abstractmethod
    def write_stored(self, value: torch.Tensor | None, owner: int) -> None:
        """Restore a stored tensor that ``owner`` holds (from ``adopt``)."""

    @abc.abstractmethod
    def stored_spec(self) -> dict[str, Any] | None:
        """What a reader needs besides the tensor (the 4-bit spec), or None for a plain weight."""

    @abc.abstractmethod
    def adopt(self, tensor: torch.Tensor, spec: dict[str, Any] | None, where: str) -> torch.Tensor:
        """A stored tensor of either kind (``spec`` None: a plain weight) as this weight's own
        stored form; a mismatch is a UserError naming ``where``. Local: no collective."""

    @abc.abstractmethod
    def as_trained(self, w0: torch.Tensor) -> torch.Tensor:
        """The base checkpoint's weight ``w0`` as training saw it, in fp32 (cast to the training
        dtype, or quantized and dequantized)."""

    @property
    def dense_weight(self) -> nn.Parameter | None:
        """The plain weight a fused kernel may read directly, or None."""
        return None


class DenseFrozen(FrozenWeight):
    """A plain ``nn.Linear``'s weight, possibly ZeRO-3 partitioned."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.shape = (linear.out_features, linear.in_features)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dense_weight(self) -> nn.Parameter:
        return self.weight

    # Each read or write first takes back a sparse update held merged in the weight
    # (``sparse_linear.HeldMerge``): they see and replace ``W0`` itself.
    def read_full(self, keep: bool) -> torch.Tensor | None:
        release_merge(self.weight)
        return read_full(self.weight, master=False, keep=keep)

    def write_full(self, value: torch.Tensor | None, owner: int) -> None:
        release_merge(self.weight)
        write_from_owner(self.weight, value, owner)

    def read_stored(self, keep: bool) -> torch.Tensor | None:
        release_merge(self.weight)
        return read_full(self.weight, master=False, keep=keep, dtype=None)

    def write_stored(self, value: torch.Tensor | None, owner: int) -> None:
        release_merge(self.weight)
        write_from_owner(self.weight, value, owner)

    def stored_spec(self) -> None:
        return None

    def adopt(self, tensor: torch.Tensor, spec: dict[str, Any] | None, where: str) -> torch.Tensor:
        if spec is not None:  # written by a 4-bit run, resumed with plain frozen weights
            tensor = dequantize(tensor, QuantSpec.from_dict(spec))
        if tuple(tensor.shape) != self.shape:
            raise UserError(
                f"{where} has shape {tuple(tensor.shape)}, the model {self.shape}; the "
                "checkpoint does not match this model"
            )
        return tensor

    def as_trained(self, w0: torch.Tensor) -> torch.Tensor:
        return w0.to(self.weight.dtype).float()


def frozen_weight(module: nn.Module) -> FrozenWeight:
    """The frozen-weight interface of a linear layer (plain or 4-bit)."""
    if isinstance(module, FrozenWeight):
        return module
    if isinstance(module, nn.Linear):
        return DenseFrozen(module)
    raise TypeError(f"{type(module).__name__} is not a frozen linear layer")
