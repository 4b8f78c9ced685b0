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
import weakref
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


PositionsSource = torch.Tensor | Callable[[], torch.Tensor]


class HeldMerge:
    """``S`` kept written into a frozen ``W`` that this rank holds whole, from one GEMM to the
    next: ``W[p] = W0[p] + S`` (summed in fp32, rounded once to ``W``'s dtype, the bits of
    ``merged_in_place`` and ``sparse_add``), rewritten only when ``S`` has changed.

    Why: writing ``S`` in for each GEMM and ``W0`` back after it costs four passes over the mask
    per matrix and micro-batch (forward and input gradient); held, it costs one pass per
    optimizer step, and a comparison of ``S`` with the copy it was merged from (sequential, so
    a small fraction of a pass). Each rewrite starts from the saved ``W0``, so no error builds
    up over steps. Everything that reads or writes the frozen weight itself (``FrozenWeight``,
    export's merge, a new mask) calls ``release_merge`` first and finds ``W0``.
    """

    def __init__(self, weight: torch.Tensor, positions: torch.Tensor) -> None:
        self._weight, self.positions = weakref.ref(weight), positions
        self.storage = 0  # the weight's storage while merged
        self.saved: torch.Tensor | None = None  # W0 at the mask, in W's dtype
        self.values: torch.Tensor | None = None  # the S that W holds, in S's dtype

    @property
    def weight(self) -> torch.Tensor | None:
        return self._weight()

    def _check_storage(self) -> None:
        if self.weight.data_ptr() != self.storage:
            raise RuntimeError(
                "the frozen weight's storage was replaced while the sparse update was merged "
                "into it; call rosa_ds.kernels.sparse_linear.release_merge(weight) before "
                "replacing weight.data (module.to() does it itself)"
            )

    def hold(self, values: torch.Tensor) -> None:
        if self.saved is None:  # not merged: the weight may have moved since, merge into it now
            self.storage = self.weight.data_ptr()
        else:
            self._check_storage()
        current = values.detach()
        # On the CPU a comparison with the merged copy (sequential) is cheaper than a rewrite
        # (scattered). On a GPU the comparison's answer would stop the host until the device
        # caught up, at every GEMM: there the merge is rewritten from W0 each time instead,
        # one scatter with no restore and no copy of S kept.
        on_cpu = current.device.type == "cpu"
        if on_cpu and self.values is not None and torch.equal(current, self.values):
            return
        flat = self.weight.data.view(-1)
        merged = current.float().contiguous()
        native = cpu_native.kernels() if flat.device.type == "cpu" else None
        with torch.no_grad():
            if self.saved is None and native is not None:  # save W0 and merge in one pass
                self.saved = native.merge_in_place(flat, merged, self.positions)
            else:
                if self.saved is None:
                    self.saved = flat.index_select(0, self.positions)
                write_merged(flat, self.saved, merged, self.positions)
        self.values = current.clone() if on_cpu else None

    def release(self) -> None:
        """``W0`` back at the mask."""
        if self.saved is None:
            return
        self._check_storage()
        flat = self.weight.data.view(-1)
        native = cpu_native.kernels() if flat.device.type == "cpu" else None
        with torch.no_grad():
            if native is not None:
                native.restore(flat, self.saved, self.positions)
            else:
                flat.index_copy_(0, self.positions, self.saved)
        self.saved = self.values = None


def write_merged(
    flat: torch.Tensor, saved: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> None:
    """``W[p] = W0[p] + S`` from the saved ``W0`` (``flat``: ``W`` viewed flat; ``values``:
    ``S`` in fp32), summed in fp32 and rounded once to ``W``'s dtype: the compiled kernel on
    the CPU where it is built, else torch's ``index_copy_`` (the same bits)."""
    native = cpu_native.kernels() if flat.device.type == "cpu" else None
    if native is not None:
        native.write_merged(flat, saved, values, positions)
    else:
        flat.index_copy_(0, positions, (saved.float() + values).to(flat.dtype))


@contextlib.contextmanager
def merged_in_place(weight: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
    """``W`` holds ``W + S`` inside the block and its own values again after it, however the
    block ends: a ``HeldMerge`` for one block (``S`` written over ``W`` at the mask's row-major
    ``positions``, O(nnz) where a merged copy is O(numel); the same bits as ``sparse_add``)."""
    held = HeldMerge(weight, positions)
    held.hold(values)
    try:
        yield
    finally:
        held.release()


# One HeldMerge per frozen weight that has been merged into, by the weight's id (the tensors'
# == is elementwise, so a WeakKeyDictionary cannot hold them); an entry goes when its weight does.
_held: dict[int, HeldMerge] = {}


def _held_for(weight: torch.Tensor) -> HeldMerge | None:
    held = _held.get(id(weight))
    return held if held is not None and held.weight is weight else None


def hold_merged(
    weight: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """``W`` holding ``W + S`` (see ``HeldMerge``), detached, for a GEMM; ``positions`` are the
    mask's row-major flat indices (a new tensor for a new mask)."""
    held = _held_for(weight)
    if held is None:
        held = _held[id(weight)] = HeldMerge(weight, positions)
        weakref.finalize(weight, _held.pop, id(weight), None)
    elif held.positions is not positions:
        held.release()
        held.positions = positions
    held.hold(values)
    return weight.detach()


def release_merge(weight: torch.Tensor) -> None:
    """Put ``W0`` back into ``weight`` if a sparse update is held merged in it (else nothing):
    called before anything reads or writes the frozen weight itself."""
    held = _held_for(weight)
    if held is not None:
        held.release()


def forget_merge(weight: torch.Tensor) -> None:
    """Drop a held merge without writing ``W0`` back: for a weight whose storage is about to be
    freed (``Built.release``), so that its saved ``W0`` and copy of ``S`` go with it."""
    held = _held_for(weight)
    if held is not None:
        held.saved = held.values = None


def holds_merge(weight: torch.Tensor) -> bool:
    held = _held_for(weight)
    return held is not None and held.saved is not None


def _positions_now(positions: PositionsSource) -> torch.Tensor:
    return positions if isinstance(positions, torch.Tensor) else positions()


class SparseAddLinearFunction(torch.autograd.Function):
    """``x (W + S)^T + b`` with ``W`` frozen: one dense GEMM per direction on ``W + S``.

    In place (``positions``; only for a ``W`` this rank holds whole) ``S`` stays merged into
    ``W`` between GEMMs (``hold_merged``) and is rewritten when it changes. As a copy (ZeRO-3,
    where the weight is gathered again for backward) the merge is redone for the input
    gradient, so that no second dense weight stays alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, values, source: StructureSource, positions):
        ctx.source, ctx.positions, ctx.weight = source, positions, weight
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, values)
        return torch.nn.functional.linear(
            x2d, _merged_weight(weight, values, source, positions), bias
        )

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, values = ctx.saved_tensors
        s = _structure(ctx.source)
        dx = dbias = dv = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _merged_weight(ctx.weight, values, s, ctx.positions)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        if ctx.needs_input_grad[3]:
            dv = _ops(dy.device).sddmm(dy, x2d, s).to(values.dtype)
        return dx, None, dbias, dv, None, None


def _merged_weight(weight, values, source: StructureSource, positions: PositionsSource | None):
    """``W + S`` for one GEMM: ``W`` itself holding ``S`` (``positions`` given: the mask's flat
    indices, or a function returning them), else a dense copy from ``sparse_add``."""
    if positions is None:
        release_merge(weight)  # the copy starts from W0, whatever ran before
        return _ops(weight.device).sparse_add(weight.detach(), values.detach(), _structure(source))
    return hold_merged(weight, values, _positions_now(positions))


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
