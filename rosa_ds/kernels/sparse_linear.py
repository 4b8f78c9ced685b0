"""``y = x S^T`` with a trainable-valued, fixed-mask sparse ``S``: one autograd function, one
dispatch point choosing the backend by device.

Backends: ``triton`` (``triton_sparse``: CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``
when forced) and ``torch`` (``torch_sparse``: torch's CSR kernels, the CPU path). ``auto``
picks Triton for CUDA tensors when Triton is installed, torch otherwise; ``set_backend`` (the
run config's ``adapter.sparse_kernel``) forces one.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from rosa_ds.kernels import torch_sparse
from rosa_ds.kernels.csr import SparseStructure

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("ROSA_DS_SPARSE_BACKEND", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse kernel backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device) -> str:
    """The kernel path a device uses (``rosa-ds env`` reports it)."""
    if _backend != "auto":
        return _backend
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def _ops(device: torch.device):
    if backend_for(device) == "triton":
        from rosa_ds.kernels import triton_sparse

        return triton_sparse
    return torch_sparse


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
