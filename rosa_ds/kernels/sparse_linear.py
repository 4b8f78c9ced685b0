"""``y = x S^T`` with a trainable-valued, fixed-mask sparse ``S``, alone or merged into the
frozen ``W`` (in place, or into a dense copy under ZeRO-3): the autograd functions, and one
dispatch point choosing the backend by device.

Backends: ``triton`` (``triton_sparse``: CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``
when forced) and ``torch`` (``torch_sparse``: torch's CSR kernels, the CPU path). ``auto``
picks Triton for CUDA tensors when Triton is installed, torch otherwise; ``set_backend`` (the
run config's ``adapter.sparse_kernel``) forces one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable

import torch

from rosa_ds.kernels import cpu_native, torch_sparse
from rosa_ds.kernels.csr import SparseStructure

BACKENDS = ("auto", "torch", "triton")
# A mask, or a function that returns it when called: the autograd functions call it in forward
# and again in backward, so a layer whose indices ZeRO-3 partitions keeps none alive in between.
StructureSource = SparseStructure | Callable[[], SparseStructure]
PATHS = ("auto", "spmm", "add")
_backend = os.environ.get("ROSA_DS_SPARSE_BACKEND", "auto")
_path = "auto"


def set_path(name: str) -> None:
    """How the sparse part joins the frozen layer: ``spmm`` (a separate sparse product),
    ``add`` (merge ``S`` into ``W`` and run one GEMM, the reference's default: in place where
    the layer holds ``W`` whole, else into a dense copy), or ``auto`` (in place where it can,
    else per call by the cost model of ``use_sparse_add``)."""
    global _path
    if name not in PATHS:
        raise ValueError(f"unknown sparse path {name!r}; choose one of {PATHS}")
    _path = name


def use_sparse_add(nnz: int, numel: int, tokens: int) -> bool:
    """For a ZeRO-3 weight (no in-place merge): sparse-add costs two merged copies (forward,
    input gradient), O(numel) each; SpMM costs two sparse products, O(nnz x tokens) each; the
    value gradient (SDDMM) is common to both."""
    if _path != "auto":
        return _path == "add"
    return nnz * tokens > numel


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


def prepare(device: torch.device) -> None:
    """Build what this device's sparse path compiles (the CPU kernels: about 25 s, once per
    cache) when the engine is built, so that no rank waits for a compiler inside a training
    step or an evaluation pass."""
    if device.type == "cpu" and backend_for(device) == "torch":
        cpu_native.kernels()


def _structure(source: StructureSource) -> SparseStructure:
    return source if isinstance(source, SparseStructure) else source()


def _ops(device: torch.device):
    if backend_for(device) == "triton":
        from rosa_ds.kernels import triton_sparse

        return triton_sparse
    return torch_sparse


class SparseLinearFunction(torch.autograd.Function):
    """``x S^T`` for a fixed mask: SpMM forward, SpMM and SDDMM (masked) backward."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, source: StructureSource):
        ctx.source = source
        ctx.save_for_backward(x2d, values)
        return _ops(x2d.device).spmm(x2d, values, _structure(source))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, values = ctx.saved_tensors
        s = _structure(ctx.source)
        ops = _ops(dy.device)
        dx = ops.spmm_t(dy, values, s) if ctx.needs_input_grad[0] else None
        dv = ops.sddmm(dy, x2d, s).to(values.dtype) if ctx.needs_input_grad[1] else None
        return dx, dv, None


@contextlib.contextmanager
def merged_in_place(weight: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
    """``W`` holds ``W + S`` inside the block and its own values again after it, however the
    block ends: ``S`` is written over ``W`` at the mask's row-major ``positions`` (O(nnz),
    where a merged copy is O(numel)). The sum is formed in fp32 and rounded once to ``W``'s
    dtype, as ``sparse_add`` does, so both merges give the same bits."""
    flat = weight.data.view(-1)
    native = cpu_native.kernels() if flat.device.type == "cpu" else None
    with torch.no_grad():
        if native is not None:  # the same bits in one pass over the mask
            saved = native.merge_in_place(flat, values.detach().float().contiguous(), positions)
        else:
            saved = flat.index_select(0, positions)
            merged = saved.float() + values.detach().float()
            flat.index_copy_(0, positions, merged.to(flat.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            if native is not None:
                native.restore(flat, saved, positions)
            else:
                flat.index_copy_(0, positions, saved)


PositionsSource = torch.Tensor | Callable[[], torch.Tensor]


@contextlib.contextmanager
def _merged(weight, values, source: StructureSource, positions: PositionsSource | None):
    """``W + S`` for one GEMM: ``W`` itself with ``S`` written in (``positions`` given: the mask's
    flat indices, or a function returning them), else a dense copy from ``sparse_add``."""
    if positions is None:
        yield _ops(weight.device).sparse_add(weight.detach(), values.detach(), _structure(source))
        return
    if not isinstance(positions, torch.Tensor):
        positions = positions()
    with merged_in_place(weight, values, positions):
        yield weight.detach()


class SparseAddLinearFunction(torch.autograd.Function):
    """``x (W + S)^T + b`` with ``W`` frozen: one dense GEMM per direction on ``W + S``.

    The merge is redone for the input gradient rather than kept: in place (``positions``; only
    for a ``W`` this rank holds whole) ``W`` holds its own values whenever no GEMM runs; as a
    copy (ZeRO-3, where the weight is gathered again for backward) no second dense weight stays
    alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, values, source: StructureSource, positions):
        ctx.source, ctx.positions, ctx.weight = source, positions, weight
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, values)
        with _merged(weight, values, source, positions) as merged:
            return torch.nn.functional.linear(x2d, merged, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, values = ctx.saved_tensors
        s = _structure(ctx.source)
        dx = dbias = dv = None
        if ctx.needs_input_grad[0]:
            with _merged(ctx.weight, values, s, ctx.positions) as merged:
                dx = dy @ merged
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        if ctx.needs_input_grad[3]:
            dv = _ops(dy.device).sddmm(dy, x2d, s).to(values.dtype)
        return dx, None, dbias, dv, None, None


def merges_in_place() -> bool:
    """May a layer that holds its frozen weight whole merge ``S`` into it in place? Cheaper
    than either other path at any token count (O(nnz) per GEMM), so unless ``spmm`` is forced."""
    return _path != "spmm"


def sparse_add_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    s: StructureSource,
    positions: PositionsSource | None = None,
) -> torch.Tensor:
    """``x (W + S)^T + b`` for x of shape (..., in); ``W`` must not need a gradient. With
    ``positions`` (the mask's row-major flat indices, int64 on ``W``'s device, or a function
    returning them) ``S`` is merged into ``W`` in place, else into a dense copy."""
    lead = x.shape[:-1]
    y = SparseAddLinearFunction.apply(
        x.reshape(-1, x.shape[-1]), weight, bias, values, s, positions
    )
    return y.reshape(*lead, weight.shape[0])


def sparse_linear(x: torch.Tensor, values: torch.Tensor, s: StructureSource) -> torch.Tensor:
    """``x S^T`` for x of shape (..., in)."""
    lead = x.shape[:-1]
    y = SparseLinearFunction.apply(x.reshape(-1, x.shape[-1]), values, s)
    return y.reshape(*lead, y.shape[-1])
