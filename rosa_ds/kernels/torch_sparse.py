"""Plain-torch sparse kernels (the CPU path): SpMM, transposed SpMM and SDDMM over CSR.

They compute in fp32 (torch's CPU CSR kernels have no bf16) and return the caller's dtype.
"""

from __future__ import annotations

import warnings

import torch

from rosa_ds.kernels import cpu_native
from rosa_ds.kernels.csr import SparseStructure

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _csr(row_ptr, col_idx, values, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(row_ptr, col_idx, values, shape, check_invariants=False)


def spmm(x: torch.Tensor, values: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``x S^T`` for x of shape (T, in): (T, out)."""
    csr = _csr(s.row_ptr, s.col_idx, values.float(), s.shape)
    return torch.sparse.mm(csr, x.float().T).T.to(x.dtype)


def spmm_t(dy: torch.Tensor, values: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``dy S`` for dy of shape (T, out): (T, in), through the cached transposed CSR."""
    t_values = values.float()[s.t_perm.long()]
    csr_t = _csr(s.t_row_ptr, s.t_col_idx, t_values, (s.shape[1], s.shape[0]))
    return torch.sparse.mm(csr_t, dy.float().T).T.to(dy.dtype)


def sddmm(dy: torch.Tensor, x: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``(dy^T x)`` sampled at the non-zeros, in CSR order: the gradient of the values. The
    compiled kernel where it is built (``cpu_native``), else torch's ``sampled_addmm``."""
    native = cpu_native.kernels() if dy.device.type == "cpu" else None
    if native is not None:
        if not (dy.dtype == x.dtype and dy.dtype in (torch.float32, torch.bfloat16)):
            dy, x = dy.float(), x.float()
        return native.sddmm(dy.contiguous(), x.contiguous(), s.row_ptr, s.col_idx)
    return sampled_sddmm(dy, x, s)


def sampled_sddmm(dy: torch.Tensor, x: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``sddmm`` through torch's ``sampled_addmm``, which first copies both operands whole into
    feature-major layout."""
    zeros = torch.zeros(s.nnz, dtype=torch.float32, device=s.row_ptr.device)
    pattern = _csr(s.row_ptr, s.col_idx, zeros, s.shape)
    out = torch.sparse.sampled_addmm(pattern, dy.float().T.contiguous(), x.float(), beta=0.0)
    return out.values()


def sparse_add(w: torch.Tensor, values: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``W + S`` as a new dense tensor in ``w``'s dtype: the sum in fp32, rounded once (as the
    Triton kernel does), not ``S`` rounded to ``W``'s dtype and then the sum again."""
    out = w.detach().clone()
    flat = out.view(-1)
    idx = s.flat_indices().to(w.device)
    if w.dtype == torch.float32:  # each position once: one fp32 addition each, in one pass
        flat.index_add_(0, idx, values.detach().float())
        return out
    merged = flat.index_select(0, idx).float() + values.detach().float()
    flat.index_copy_(0, idx, merged.to(w.dtype))
    return out
