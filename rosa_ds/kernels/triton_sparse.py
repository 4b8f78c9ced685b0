"""Triton kernels for the sparse adapter: SpMM, transposed SpMM, SDDMM and sparse-add over CSR.

Structure-aware scheduling: programs are launched only for the non-empty rows, in the order of
``row_order`` (most non-zeros first, so the longest rows start first), and the SDDMM grid's
second axis is sized from the longest row; both come from the mask, computed once.
All kernels accumulate in fp32 whatever the input dtype (fp32, bf16, fp16).

Every launch configuration is listed in ``LAUNCH_CONFIGS``; the test suite compiles each of them
ahead of time for sm_80 and sm_90 (and fails for a kernel that has none), so code that the
interpreter accepts but the GPU compiler rejects is caught without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rosa_ds.kernels.csr import SparseStructure

BLOCK_T = 32  # tokens per program
BLOCK_K = 32  # non-zeros per loop iteration


@triton.jit
def spmm_kernel(
    x_ptr,
    y_ptr,
    row_ptr,
    col_idx,
    values,
    perm,
    row_order,
    n_tokens,
    stride_x_t,
    stride_x_f,
    stride_y_t,
    stride_y_f,
    HAS_PERM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y[t, row] = sum_k x[t, col_k] * v_k`` for one non-empty row and a block of tokens.
    Feature-major operands (``stride_*_t == 1``) make every load and the store runs of tokens."""
    row = tl.load(row_order + tl.program_id(0))
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        cols = tl.load(col_idx + offs_k, mask=mask_k, other=0).to(tl.int64)
        if HAS_PERM:  # noqa: SIM108 - a compile-time branch
            slot = tl.load(perm + offs_k, mask=mask_k, other=0)
        else:
            slot = offs_k
        vals = tl.load(values + slot, mask=mask_k, other=0.0).to(tl.float32)
        xs = tl.load(
            x_ptr + offs_t[:, None].to(tl.int64) * stride_x_t + cols[None, :] * stride_x_f,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xs * vals[None, :], axis=1)
    y_row = y_ptr + row.to(tl.int64) * stride_y_f
    tl.store(y_row + offs_t.to(tl.int64) * stride_y_t, acc.to(y_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def sddmm_kernel(
    dy_ptr,
    x_ptr,
    out_ptr,
    row_ptr,
    col_idx,
    row_order,
    n_tokens,
    stride_dy_t,
    stride_dy_f,
    stride_x_t,
    stride_x_f,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out_k = sum_t dy[t, row] * x[t, col_k]`` for a block of one row's non-zeros. With
    feature-major operands (``stride_*_t == 1``) each non-zero reads a contiguous run of
    tokens; with token-major ones every token is a gather across the row's columns."""
    row = tl.load(row_order + tl.program_id(0))
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    offs_k = start + tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < end
    cols = tl.load(col_idx + offs_k, mask=mask_k, other=0).to(tl.int64)
    dy_row = dy_ptr + row.to(tl.int64) * stride_dy_f
    x_cols = x_ptr + cols * stride_x_f
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_tokens
        dy = tl.load(dy_row + offs_t.to(tl.int64) * stride_dy_t, mask=mask_t, other=0.0).to(
            tl.float32
        )
        xs = tl.load(
            x_cols[None, :] + offs_t[:, None].to(tl.int64) * stride_x_t,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xs * dy[:, None], axis=0)
    tl.store(out_ptr + offs_k, acc, mask=mask_k)


@triton.jit
def sparse_add_kernel(
    w_ptr,
    row_ptr,
    col_idx,
    values,
    row_order,
    stride_w,
    BLOCK_K: tl.constexpr,
):
    """``w[row, col_k] += v_k`` for a block of one row's non-zeros (w is a dense copy)."""
    row = tl.load(row_order + tl.program_id(0))
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    offs_k = start + tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < end
    cols = tl.load(col_idx + offs_k, mask=mask_k, other=0)
    ptrs = w_ptr + row.to(tl.int64) * stride_w + cols
    w = tl.load(ptrs, mask=mask_k, other=0.0).to(tl.float32)
    vals = tl.load(values + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    tl.store(ptrs, (w + vals).to(w_ptr.dtype.element_ty), mask=mask_k)


# Every (kernel, constexprs) the wrappers below can launch, per data dtype: what CI compiles.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAUNCH_CONFIGS = {
    "spmm_kernel": [{"HAS_PERM": p, "BLOCK_T": BLOCK_T, "BLOCK_K": BLOCK_K} for p in (0, 1)],
    "sddmm_kernel": [{"BLOCK_T": BLOCK_T, "BLOCK_K": BLOCK_K}],
    "sparse_add_kernel": [{"BLOCK_K": BLOCK_K}],
}
KERNELS = {
    "spmm_kernel": spmm_kernel,
    "sddmm_kernel": sddmm_kernel,
    "sparse_add_kernel": sparse_add_kernel,
}
# Argument types for ahead-of-time compilation; "{dt}" is the data dtype (fp32, bf16, fp16).
SIGNATURES = {
    "spmm_kernel": {
        "x_ptr": "*{dt}",
        "y_ptr": "*{dt}",
        "row_ptr": "*i32",
        "col_idx": "*i32",
        "values": "*{dt}",
        "perm": "*i32",
        "row_order": "*i32",
        "n_tokens": "i32",
        "stride_x_t": "i32",
        "stride_x_f": "i32",
        "stride_y_t": "i32",
        "stride_y_f": "i32",
    },
    "sddmm_kernel": {
        "dy_ptr": "*{dt}",
        "x_ptr": "*{dt}",
        "out_ptr": "*fp32",
        "row_ptr": "*i32",
        "col_idx": "*i32",
        "row_order": "*i32",
        "n_tokens": "i32",
        "stride_dy_t": "i32",
        "stride_dy_f": "i32",
        "stride_x_t": "i32",
        "stride_x_f": "i32",
    },
    "sparse_add_kernel": {
        "w_ptr": "*{dt}",
        "row_ptr": "*i32",
        "col_idx": "*i32",
        "values": "*{dt}",
        "row_order": "*i32",
        "stride_w": "i32",
    },
}


def _row_blocks(s: SparseStructure) -> int:
    """Programs per row on the non-zero axis: enough for the longest row (known per mask)."""
    longest = s.max_row_nnz
    if longest < 0:  # a structure built by hand, without the count
        longest = int((s.row_ptr[1:] - s.row_ptr[:-1]).max()) if s.row_ptr.numel() > 1 else 0
    return max(1, triton.cdiv(longest, BLOCK_K))


def _nonempty(row_ptr: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    if order is not None:
        return order
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.nonzero(counts).flatten()
    return rows[torch.argsort(counts[rows], descending=True, stable=True)].to(torch.int32)


def _operand(t: torch.Tensor, feature_major: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """A (tokens, features) operand as the kernels read it, with its (token, feature) strides:
    a copy with the tokens contiguous, or the tensor itself made contiguous as it comes."""
    if feature_major:
        copy = t.t().contiguous()  # (features, tokens)
        return copy, (1, copy.stride(0))
    t = t.contiguous()
    return t, (t.stride(0), 1)


def _spmm(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    perm: torch.Tensor | None,
    rows: torch.Tensor,
    n_out: int,
    feature_major: bool,
) -> torch.Tensor:
    """``y[t, r] = sum_k x[t, col_k] v_k`` over one CSR: x (T, n_in) -> (T, n_out). With
    ``feature_major`` it reads a tokens-contiguous copy of ``x`` and writes ``y`` that way,
    returned as its transposed view (not contiguous: callers reshape or add out of place; an
    autograd function's output view must not be modified in place)."""
    tokens = x.shape[0]
    x_op, x_strides = _operand(x, feature_major)
    if feature_major:
        y_op = torch.zeros(n_out, tokens, dtype=x.dtype, device=x.device)
        y_strides = (1, y_op.stride(0))
    else:
        y_op = torch.zeros(tokens, n_out, dtype=x.dtype, device=x.device)
        y_strides = (y_op.stride(0), 1)
    if rows.numel() and tokens:
        grid = (rows.numel(), triton.cdiv(tokens, BLOCK_T))
        spmm_kernel[grid](
            x_op,
            y_op,
            row_ptr,
            col_idx,
            values.contiguous(),
            col_idx if perm is None else perm,
            rows,
            tokens,
            *x_strides,
            *y_strides,
            HAS_PERM=int(perm is not None),
            BLOCK_T=BLOCK_T,
            BLOCK_K=BLOCK_K,
        )
    return y_op.t() if feature_major else y_op


def spmm(
    x: torch.Tensor, values: torch.Tensor, s: SparseStructure, feature_major: bool = True
) -> torch.Tensor:
    """``x S^T``: x (T, in) -> (T, out)."""
    return _spmm(x, values, s.row_ptr, s.col_idx, None, s.row_order, s.shape[0], feature_major)


def spmm_t(
    dy: torch.Tensor, values: torch.Tensor, s: SparseStructure, feature_major: bool = True
) -> torch.Tensor:
    """``dy S``: dy (T, out) -> (T, in), over the cached transposed CSR."""
    rows = _nonempty(s.t_row_ptr, s.t_row_order)
    return _spmm(dy, values, s.t_row_ptr, s.t_col_idx, s.t_perm, rows, s.shape[1], feature_major)


def sddmm(
    dy: torch.Tensor, x: torch.Tensor, s: SparseStructure, feature_major: bool = True
) -> torch.Tensor:
    """``(dy^T x)`` at the non-zeros, in CSR order (fp32). ``feature_major`` first copies both
    operands with the tokens contiguous (``(out + in) x T`` elements, once), so each non-zero's
    dot product reads whole runs of tokens instead of one scattered element per token (the
    same layout the CPU kernel builds block by block); ``False`` reads them token-major as
    they come, the layout ``benchmarks/sparse_kernels.py`` compares against."""
    dy_op, dy_strides = _operand(dy, feature_major)
    x_op, x_strides = _operand(x, feature_major)
    out = torch.zeros(s.nnz, dtype=torch.float32, device=x.device)
    rows = s.row_order
    if rows.numel():
        grid = (rows.numel(), _row_blocks(s))
        sddmm_kernel[grid](
            dy_op,
            x_op,
            out,
            s.row_ptr,
            s.col_idx,
            rows,
            x.shape[0],
            *dy_strides,
            *x_strides,
            BLOCK_T=BLOCK_T,
            BLOCK_K=BLOCK_K,
        )
    return out


def sparse_add(w: torch.Tensor, values: torch.Tensor, s: SparseStructure) -> torch.Tensor:
    """``W + S`` as a new dense tensor in ``w``'s dtype."""
    out = w.contiguous().clone()
    rows = s.row_order
    if rows.numel():
        grid = (rows.numel(), _row_blocks(s))
        sparse_add_kernel[grid](
            out, s.row_ptr, s.col_idx, values.contiguous(), rows, out.stride(0), BLOCK_K=BLOCK_K
        )
    return out
