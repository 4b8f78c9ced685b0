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

import torch
import torch.nn.functional as F
from torch import nn

from rosa_ds.quant.nf4 import QuantError, QuantSpec, dequantize, quantize, quantize_with_error


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


# How often a layer had to gather its own records because DeepSpeed's hooks had not (tests
# check that training never needs it: forward and backward are gathered by DeepSpeed).
OWN_GATHERS = [0]


@contextlib.contextmanager
def _available(param: nn.Parameter):
    """The full records inside the block: DeepSpeed's hooks have normally gathered them already
    (forward, and again before backward); if not, gather them here (a collective)."""
    if _is_zero3(param) and param.numel() != param.ds_numel:
        import deepspeed

        OWN_GATHERS[0] += 1
        with deepspeed.zero.GatheredParameters([param]):
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


class QuantizedLinear(nn.Module):
    """``y = x deq(Q)^T + b`` with ``Q`` frozen 4-bit records; ``compute_dtype``: bf16 or fp32."""

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
        if _is_zero3(q):
            return q.ds_tensor.numel() * q.ds_tensor.element_size()
        return q.numel() * q.element_size()

    # --- rewriting (ROSA resampling) -------------------------------------------------------
    def read_full(self, keep: bool) -> torch.Tensor | None:
        """Every rank calls this (a collective under ZeRO-3); ranks with ``keep`` get the
        dequantized weight in fp32."""
        if _is_zero3(self.qweight):
            import deepspeed

            with deepspeed.zero.GatheredParameters([self.qweight]):
                return (
                    dequantize(self.qweight.data, self.spec, torch.float32).cpu() if keep else None
                )
        return dequantize(self.qweight.data, self.spec, torch.float32).cpu() if keep else None

    def write_full(self, value: torch.Tensor | None, owner: int) -> QuantError | None:
        """Re-quantize a new weight that only ``owner`` holds and write it to every rank's copy
        or partition; every rank calls this. The owner gets the re-quantization error back."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        q, err = None, None
        if rank == owner:
            q, err = quantize_with_error(value.float().cpu(), self.spec)
        p = self.qweight
        if _is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=owner):
                if rank == owner:
                    p.data.copy_(q.to(p.device))
            return err
        if rank == owner:
            p.data.copy_(q.to(p.device))
        if world > 1:
            dist.broadcast(p.data, src=owner)
        return err

    def write_records(self, q: torch.Tensor | None, owner: int) -> None:
        """Write records (e.g. read from a checkpoint) that ``owner`` holds; every rank calls it."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        p = self.qweight
        if rank == owner and q.numel() != self.spec.nbytes:
            raise ValueError(f"expected {self.spec.nbytes} bytes, got {q.numel()}")
        if _is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=owner):
                if rank == owner:
                    p.data.copy_(q.reshape(-1).to(p.device))
            return
        if rank == owner:
            p.data.copy_(q.reshape(-1).to(p.device))
        if world > 1:
            dist.broadcast(p.data, src=owner)

    def read_records(self, keep: bool) -> torch.Tensor | None:
        """The full records (a collective under ZeRO-3), on ranks with ``keep``."""
        p = self.qweight
        if _is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.data.detach().cpu().clone() if keep else None
        return p.data.detach().cpu().clone() if keep else None

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
