"""``y = x S^T`` with a trainable-valued, fixed-mask sparse ``S``: one autograd function, one
dispatch point choosing the backend by device."""

from __future__ import annotations

import torch

from rosa_ds.adapters.sparse import SparseStructure
from rosa_ds.kernels import torch_sparse


def backend_for(device: torch.device) -> str:
    """The kernel path a device uses (``rosa-ds env`` reports it)."""
    return "torch"


def _ops(device: torch.device):
    return torch_sparse  # the Triton backend for CUDA tensors plugs in here


class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, s: SparseStructure):
        ctx.structure = s
        ctx.save_for_backward(x2d, values)
        return _ops(x2d.device).spmm(x2d, values, s)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, values = ctx.saved_tensors
        s = ctx.structure
        ops = _ops(dy.device)
        dx = ops.spmm_t(dy, values, s) if ctx.needs_input_grad[0] else None
        dv = ops.sddmm(dy, x2d, s).to(values.dtype) if ctx.needs_input_grad[1] else None
        return dx, dv, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``x S^T`` for x of shape (..., in)."""
    lead = x.shape[:-1]
    y = SparseLinearFunction.apply(x.reshape(-1, x.shape[-1]), values, s)
    return y.reshape(*lead, s.shape[0])
