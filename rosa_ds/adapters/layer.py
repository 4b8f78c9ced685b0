"""The one adapter layer: a frozen linear map plus a trainable low-rank and/or sparse update.

    y = base(x) + s * dropout(x) A^T B^T + x S^T          s = alpha / r

``base`` stays the original module, called as a module, so DeepSpeed ZeRO-3 gathers its
partitioned weight through its own hooks and a 4-bit ``QuantizedLinear`` (``rosa_ds.quant``)
can take its place.
With rank 0 there is no low-rank part (SpA); with no mask there is no sparse part (LoRA); with
both it is RoSA. ``S`` has a fixed mask and trainable ``sparse_values``, which start at zero so
that attaching a mask does not change the function. The mask's index arrays (``SparseStructure``)
live packed in one frozen int32 parameter, ``mask_index``, so that under ZeRO-3 every rank keeps
only its partition of them, as of every other parameter, and DeepSpeed's module hooks gather
them with the values for forward and again for backward; the sparse autograd functions read
the structure again in backward instead of keeping it from forward. With ``train_base`` the
base weight itself is trained (full fine-tuning of the targeted layers), with no low-rank or
sparse part.

The layer states its contract: ``adapter_params()`` are the tensors training updates, by the
names adapter files use, and ``ROLES`` gives each one's optimizer group; ``read_mask()`` gives the
mask indices an adapter file carries beside them. Files, optimizer groups, export and
evaluation read these instead of parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.kernels.low_rank import low_rank_add
from rosa_ds.kernels.sparse_linear import (
    merges_in_place,
    release_merge,
    sparse_add_linear,
    sparse_linear,
    use_sparse_add,
)
from rosa_ds.quant.frozen import FrozenWeight, frozen_weight
from rosa_ds.zero_params import gathered, is_partitioned

# The optimizer group of each trainable tensor: the low-rank factors are reset together at a
# resample (Adam's step count is per group), the sparse values and full weights keep their state.
ROLES = {"lora_A": "lowrank", "lora_B": "lowrank", "sparse_values": "sparse", "weight": "full"}
# The mask indices an adapter file stores beside the sparse values (the rest is derived).
MASK_FIELDS = ("row_ptr", "col_idx")


class AdaptedLinear(nn.Module):
    """A frozen (or, with ``train_base``, trainable) linear layer plus its update; see the
    module docstring for the parts and the contract."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        train_base: bool = False,
    ) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if train_base and rank:
            raise ValueError("a fully trained layer has no low-rank part; use rank 0")
        self.base = base
        self.train_base = train_base
        if train_base:
            base.weight.requires_grad_(True)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank if rank else 0.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
            self.reset_adapter()
        self.sparse_values: nn.Parameter | None = None
        self.mask_index: nn.Parameter | None = None
        self.mask_nnz = 0
        self._shape = (self.out_features, self.in_features)
        self._positions: torch.Tensor | None = None  # the mask's flat indices, for in-place merges
        self._structure_cache: SparseStructure | None = None  # of a mask this rank holds whole
        self._structure_key: tuple | None = None
        # Does another module read the same weight (an output layer tied to the embeddings)?
        # Then S is never held merged in it (set by ``inject_adapters``).
        self.shares_weight = False

    def reset_adapter(self) -> None:
        """LoRA's initialization: A Kaiming-uniform, B zero, so the update starts at zero."""
        if self.rank:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # --- the contract ----------------------------------------------------------------------
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The tensors training updates, by their names in adapter files."""
        params = {}
        if self.rank:
            params["lora_A"], params["lora_B"] = self.lora_A, self.lora_B
        if self.sparse_values is not None:
            params["sparse_values"] = self.sparse_values
        if self.train_base:
            params["weight"] = self.base.weight
        return params

    def read_mask(self, keep: bool = True) -> SparseStructure | None:
        """A copy of the mask that owns its tensors, on ranks with ``keep`` (None without a
        mask). A collective under ZeRO-3 (the indices are gathered): every rank calls it."""
        if self.mask_index is None:
            return None
        with gathered([self.mask_index]):
            return self.structure.clone() if keep else None

    @property
    def frozen(self) -> FrozenWeight:
        """The frozen weight, plain or 4-bit, through one interface."""
        return frozen_weight(self.base)

    @property
    def reads_frozen_in_forward(self) -> bool:
        """Does ``forward`` read the base weight itself (the sparse-add path), not only through
        ``base``'s forward? ZeRO-3 must then gather it for this module too."""
        return self.sparse_values is not None and self.frozen.dense_weight is not None

    # --- the sparse part -------------------------------------------------------------------
    def attach_mask(self, structure: SparseStructure) -> None:
        """Give the layer a fixed sparse mask with zero-valued trainable values."""
        if structure.shape != self._shape:
            raise ValueError(f"mask shape {structure.shape} does not match layer {self._shape}")
        if self.frozen.dense_weight is not None:
            release_merge(self.base.weight)  # W0 back at the old mask's positions
        flat, self._mask_lengths = structure.packed()
        self._positions = None
        self._structure_cache = self._structure_key = None
        self.mask_index = nn.Parameter(flat, requires_grad=False)
        self.mask_nnz = structure.nnz
        self._max_row_nnz = structure.max_row_nnz
        self.sparse_values = nn.Parameter(torch.zeros(structure.nnz))

    @property
    def structure(self) -> SparseStructure | None:
        """The mask over views of ``mask_index``, which must be whole: under ZeRO-3 only inside
        forward and backward (DeepSpeed gathers it) or a ``gathered`` block (see ``read_mask``)."""
        if self.mask_index is None:
            return None
        if self.mask_index.numel() != sum(self._mask_lengths):
            raise RuntimeError(
                "the mask indices are partitioned (ZeRO-3); read them with read_mask() or "
                "inside zero_params.gathered([module.mask_index])"
            )
        return SparseStructure.from_packed(
            self.mask_index.data, self._mask_lengths, self._shape, self._max_row_nnz
        )

    def _structure_now(self) -> SparseStructure:
        """The structure as it is when called: what the sparse autograd functions read in
        forward and again in backward, so that under ZeRO-3 no index array is kept alive in
        between. A mask this rank holds whole is built once and kept (it saves two structures,
        each about ten tensor views, per matrix and micro-batch)."""
        mask = self.mask_index
        if is_partitioned(mask):
            return self.structure
        key = (mask.data_ptr(), mask.numel(), mask.device)
        if self._structure_key != key:
            self._structure_cache, self._structure_key = self.structure, key
        return self._structure_cache

    def _flat_positions(self) -> torch.Tensor:
        """The mask's row-major flat indices on the weight's device, derived once per mask
        (only for a weight this rank holds whole, so the mask is whole too)."""
        device = self.base.weight.device
        if self._positions is None or self._positions.device != device:
            self._positions = self.structure.flat_indices().to(device)
        return self._positions

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.bfloat16()`` and the like replace the weight's storage:
        ``W0`` goes back in first, and the next forward merges ``S`` into the new one."""
        if self.frozen.dense_weight is not None:
            release_merge(self.base.weight)
        return super()._apply(fn, recurse)

    # --- maths -----------------------------------------------------------------------------
    def _merge_mode(self, x: torch.Tensor) -> str | None:
        """How S joins the frozen weight in this call: ``in_place`` (held merged in a weight this
        rank holds whole and no other module reads, O(nnz) per change of S), ``copy`` (into a
        merged dense copy: a ZeRO-3 weight, gathered for the call) or None (a separate sparse
        product, or no sparse part)."""
        if not self.reads_frozen_in_forward:
            return None
        weight = self.base.weight
        whole = not is_partitioned(weight) and weight.is_contiguous()
        if merges_in_place() and whole and not self.shares_weight:
            return "in_place"
        tokens = x.numel() // self.in_features
        if use_sparse_add(self.mask_nnz, self.out_features * self.in_features, tokens):
            return "copy"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._merge_mode(x)
        base, values = self.base, self.sparse_values
        if mode != "in_place" and self.reads_frozen_in_forward:
            release_merge(base.weight)  # another path reads W itself: W0
        if mode is None:
            out = base(x)
        else:
            positions = self._flat_positions if mode == "in_place" else None
            out = sparse_add_linear(
                x, base.weight, base.bias, values, self._structure_now, positions
            )
        if self.rank:
            h = self.dropout(x).to(self.lora_A.dtype)
            out = low_rank_add(out, h, self.lora_A, self.lora_B, self.scale)
        if self.sparse_values is not None and mode is None:
            out = out + sparse_linear(x, self.sparse_values, self._structure_now).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The dense update the adapter adds to ``base.weight`` (fp32; zero when the base
        weight itself is trained)."""
        delta = torch.zeros(self._shape, device=self.frozen.device)
        if self.rank:
            delta = delta + self.scale * (self.lora_B.float() @ self.lora_A.float())
        if self.sparse_values is not None:
            delta = delta + self.structure.to_dense(self.sparse_values.detach().float())
        return delta

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, sparse_nnz={self.mask_nnz}, train_base={self.train_base}"
        )
