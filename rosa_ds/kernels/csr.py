"""The CSR structure of a sparse adapter's fixed mask, with its transpose cached: the format the
kernels operate on.

Values are not stored here (they are the adapter's trainable parameter); this is the index
structure the kernels need, built once per mask:

* ``row_ptr`` (out + 1) and ``col_idx`` (nnz), int32: the CSR of ``S`` (out x in). int32, not the
  reference's int16, so that any dimension up to 2**31 works;
* ``row_order``: the non-empty rows, most non-zeros first (load balance for row-parallel kernels;
  empty rows get no program);
* ``t_row_ptr``, ``t_col_idx``, ``t_perm``, ``t_row_order``: the CSR of ``S^T``, for each of its
  entries the position of the same entry in ``values``, and its non-empty rows by count, for the
  input gradient ``dX = dY S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIELDS = ("row_ptr", "col_idx", "row_order", "t_row_ptr", "t_col_idx", "t_perm", "t_row_order")


@dataclass
class SparseStructure:
    """A fixed sparse mask in CSR (with the row order and the transposed view the kernels use)."""

    shape: tuple[int, int]
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_order: torch.Tensor
    t_row_ptr: torch.Tensor
    t_col_idx: torch.Tensor
    t_perm: torch.Tensor
    t_row_order: torch.Tensor | None = None
    max_row_nnz: int = -1  # the longest row: sizes the SDDMM / sparse-add grids, once per mask

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @classmethod
    def from_flat_indices(cls, flat: torch.Tensor, shape: tuple[int, int]) -> SparseStructure:
        """Build from row-major flat positions ``row * in + col`` of the non-zeros."""
        out_f, in_f = shape
        flat = torch.unique(flat.long().flatten())  # sorted, so row-major order
        if flat.numel() and (flat[0] < 0 or flat[-1] >= out_f * in_f):
            raise ValueError(f"mask index out of range for shape {shape}")
        rows, cols = flat // in_f, flat % in_f
        counts = torch.bincount(rows, minlength=out_f)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.long)
        row_ptr[1:] = torch.cumsum(counts, 0)
        nonempty = torch.nonzero(counts, as_tuple=False).flatten()
        order = nonempty[torch.argsort(counts[nonempty], descending=True, stable=True)]
        # transpose: sort entries by (col, row)
        t_key = cols * out_f + rows
        t_perm = torch.argsort(t_key)
        t_counts = torch.bincount(cols, minlength=in_f)
        t_row_ptr = torch.zeros(in_f + 1, dtype=torch.long)
        t_row_ptr[1:] = torch.cumsum(t_counts, 0)
        t_nonempty = torch.nonzero(t_counts, as_tuple=False).flatten()
        t_order = t_nonempty[torch.argsort(t_counts[t_nonempty], descending=True, stable=True)]
        i32 = torch.int32
        return cls(
            shape=(out_f, in_f),
            row_ptr=row_ptr.to(i32),
            col_idx=cols.to(i32),
            row_order=order.to(i32),
            t_row_ptr=t_row_ptr.to(i32),
            t_col_idx=rows[t_perm].to(i32),
            t_perm=t_perm.to(i32),
            t_row_order=t_order.to(i32),
            max_row_nnz=int(counts.max()) if counts.numel() else 0,
        )

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor) -> SparseStructure:
        return cls.from_flat_indices(torch.nonzero(mask.flatten()).flatten(), tuple(mask.shape))

    def rows(self) -> torch.Tensor:
        """Row index of each non-zero (COO rows), int64."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def flat_indices(self) -> torch.Tensor:
        return self.rows() * self.shape[1] + self.col_idx.long()

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        dense.view(-1)[self.flat_indices().to(values.device)] = values
        return dense

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FIELDS}

    def packed(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Every index array in one flat int32 tensor, and each array's length: the form a layer
        keeps, so that ZeRO-3 can partition and gather a mask like any other parameter."""
        parts = [getattr(self, name).to(torch.int32).flatten() for name in FIELDS]
        return torch.cat(parts), tuple(p.numel() for p in parts)

    @classmethod
    def from_packed(
        cls, flat: torch.Tensor, lengths: tuple[int, ...], shape: tuple[int, int], max_row_nnz: int
    ) -> SparseStructure:
        """The structure over views of ``flat`` (``packed``'s output; nothing is copied)."""
        if flat.numel() != sum(lengths):
            raise ValueError(f"packed mask has {flat.numel()} entries, expected {sum(lengths)}")
        return cls(tuple(shape), *torch.split(flat, list(lengths)), max_row_nnz=max_row_nnz)

    def to(self, device: torch.device | str) -> SparseStructure:
        """The same structure with its index arrays on ``device`` (the kernels' inputs' device)."""
        moved = {name: getattr(self, name).to(device) for name in FIELDS}
        return SparseStructure(self.shape, **moved, max_row_nnz=self.max_row_nnz)

    def clone(self) -> SparseStructure:
        """A copy that owns its tensors (on the CPU), e.g. of a gathered structure."""
        copies = {name: getattr(self, name).detach().cpu().clone() for name in FIELDS}
        return SparseStructure(self.shape, **copies, max_row_nnz=self.max_row_nnz)

    @classmethod
    def from_csr(
        cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]
    ) -> SparseStructure:
        counts = (row_ptr[1:] - row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
        return cls.from_flat_indices(rows * shape[1] + col_idx.long(), shape)
