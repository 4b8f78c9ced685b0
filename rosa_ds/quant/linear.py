"""A frozen linear layer whose weight is stored as 4-bit records (``rosa_ds.quant.nf4``).

``QuantizedLinear`` takes an ``nn.Linear``'s place (as ``AdaptedLinear.base`` or on its own). Its
weight lives in one frozen ``uint8`` parameter, ``qweight``, so that DeepSpeed treats it like any
other frozen parameter: under ZeRO-3 every rank keeps only its partition (packed bytes and scales
alike) and DeepSpeed's module hooks gather it for the forward pass, and again before the
backward pass; under ZeRO-0/1/2 and at world size 1 it is whole on every rank.

The autograd function saves no weight for backward: it keeps the module and dequantizes again
from the (re-gathered) records to compute ``dX = dY W``. A full dequantized weight therefore lives
only inside one layer's forward or backward, never from forward to backward (which would give
back all the memory that sharding saves).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rosa_ds.errors import UserError
from rosa_ds.quant.frozen import FrozenWeight
from rosa_ds.quant.nf4 import QuantError, QuantSpec, dequantize, quantize, quantize_with_error
from rosa_ds.zero_params import gathered, is_partitioned, local_numel, read_full, write_from_owner

# How often a layer had to gather its own records because DeepSpeed's hooks had not (tests
# check that training never needs it: forward and backward are gathered by DeepSpeed).
OWN_GATHERS = [0]


@contextlib.contextmanager
def _available(param: nn.Parameter):
    """The full records inside the block: DeepSpeed's hooks have normally gathered them already
    (forward, and again before backward); if not, gather them here (a collective)."""
    if is_partitioned(param) and param.numel() != param.ds_numel:
        OWN_GATHERS[0] += 1
        with gathered([param]):
            yield param
    else:
        yield param


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, bias, module):  # noqa: ARG004 - qweight: for autograd's view
        ctx.module = module
        ctx.x_dtype = x.dtype
        w = module.dequantized()
        out = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w = ctx.module.dequantized()  # gathered again, dequantized again: nothing was kept
        grad_x = (grad_out.to(w.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None, None


class QuantizedLinear(nn.Module, FrozenWeight):
    """``y = x deq(Q)^T + b`` with ``Q`` frozen 4-bit records; ``compute_dtype``: bf16 or fp32."""

    lossy = True  # writing a weight re-quantizes it

    def __init__(
        self,
        spec: QuantSpec,
        qweight: torch.Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        source_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = spec.shape
        self.compute_dtype = compute_dtype
        self.source_dtype = source_dtype or compute_dtype  # the dtype that was quantized
        self.qweight = nn.Parameter(qweight.reshape(-1), requires_grad=False)
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedLinear:
        spec = QuantSpec(tuple(weight.shape), quant_type, block_size, double_quant)
        return cls(spec, quantize(weight, spec), bias, compute_dtype, weight.dtype)

    # --- the weight ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight in ``dtype`` (default: the compute dtype); needs the records gathered
        (inside the module's forward/backward, or under ``GatheredParameters``)."""
        with _available(self.qweight) as q:
            return dequantize(q.data, self.spec, dtype or self.compute_dtype)

    def nbytes(self) -> int:
        return self.spec.nbytes

    def local_bytes(self) -> int:
        """Bytes of records this rank holds (its ZeRO-3 partition, or everything)."""
        q = self.qweight
        return local_numel(q)[0] * q.element_size()

    # --- the frozen-weight interface (ROSA resampling, checkpoints) ------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    def read_full(self, keep: bool) -> torch.Tensor | None:
        """Every rank calls this; ranks with ``keep`` get the dequantized weight in fp32."""
        with gathered([self.qweight]):
            if not keep:
                return None
            return dequantize(self.qweight.data, self.spec, torch.float32).cpu()

    def write_full(self, value: torch.Tensor | None, owner: int) -> QuantError | None:
        """Re-quantize a new weight that only ``owner`` holds and write it to every rank's copy
        or partition; every rank calls this. The owner gets the re-quantization error back."""
        q, err = (None, None)
        if value is not None:
            q, err = quantize_with_error(value.float().cpu(), self.spec)
        write_from_owner(self.qweight, q, owner)
        return err

    def read_stored(self, keep: bool) -> torch.Tensor | None:
        """The full records (a collective under ZeRO-3), on ranks with ``keep``."""
        return read_full(self.qweight, master=False, keep=keep, dtype=None)

    def write_stored(self, value: torch.Tensor | None, owner: int) -> None:
        if value is not None and value.numel() != self.spec.nbytes:
            raise ValueError(f"expected {self.spec.nbytes} bytes, got {value.numel()}")
        write_from_owner(self.qweight, value, owner)

    def stored_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def adopt(self, tensor: torch.Tensor, spec: dict[str, Any] | None, where: str) -> torch.Tensor:
        if spec is None:  # a plain weight (a run resumed with quant.bits=4): quantize it
            if tuple(tensor.shape) != self.shape:
                raise UserError(
                    f"{where} has shape {tuple(tensor.shape)}, the model {self.shape}; the "
                    "checkpoint does not match this model"
                )
            return quantize(tensor.to(self.source_dtype), self.spec)
        if QuantSpec.from_dict(spec) != self.spec:
            raise UserError(
                f"{where}: the 4-bit records were written with {spec}, this run quantizes with "
                f"{self.spec.to_dict()}; resume with the same quant.* settings"
            )
        return tensor

    def as_trained(self, w0: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(w0.to(self.source_dtype), self.spec), self.spec, torch.float32)

    # --- maths -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFn.apply(x, self.qweight, self.bias, self)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, {s.quant_type}, "
            f"block={s.block_size}, double_quant={s.double_quant}, compute={self.compute_dtype}, "
            f"bias={self.bias is not None}"
        )


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized layer by the name of the layer it replaced (``.base`` dropped)."""
    return {
        n.removesuffix(".base"): m
        for n, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
