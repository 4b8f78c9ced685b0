"""The sparse part: CSR structure, the kernels' forward and backward against the dense masked
reference, the RoSA layer's maths, mask files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.adapters.masks import load_masks, save_masks
from rosa_ds.errors import UserError
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.kernels.sparse_linear import sparse_linear


def _mask(out_f: int, in_f: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    mask[2] = False
    mask[2, in_f // 2] = True  # a single non-zero
    return mask


@pytest.mark.parametrize("shape", [(7, 5), (33, 17), (64, 130)])
def test_structure_roundtrip_and_transpose(shape):
    mask = _mask(*shape, 0.2, 0)
    s = SparseStructure.from_dense_mask(mask)
    assert s.row_ptr.dtype == torch.int32 and s.col_idx.dtype == torch.int32
    values = torch.randn(s.nnz)
    dense = s.to_dense(values)
    assert torch.equal(dense != 0, mask)
    # the transposed CSR holds the same entries
    st = SparseStructure(
        (shape[1], shape[0]), s.t_row_ptr, s.t_col_idx, s.row_order, s.row_ptr, s.col_idx, s.t_perm
    )
    assert torch.equal(st.to_dense(values[s.t_perm.long()]), dense.T)
    counts = (s.row_ptr[1:] - s.row_ptr[:-1]).long()
    order = s.row_order.long()
    assert set(order.tolist()) == set(torch.nonzero(counts).flatten().tolist())
    assert torch.all(counts[order][:-1] >= counts[order][1:])
    assert s.flat_indices().tolist() == torch.nonzero(mask.flatten()).flatten().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 5), (33, 17)])
def test_sparse_linear_matches_dense_masked_reference(dtype, shape):
    out_f, in_f = shape
    mask = _mask(out_f, in_f, 0.3, 1)
    s = SparseStructure.from_dense_mask(mask)
    g = torch.Generator().manual_seed(2)
    values = torch.randn(s.nnz, generator=g).to(dtype).requires_grad_()
    x = torch.randn(3, 4, in_f, generator=g).to(dtype).requires_grad_()
    y = sparse_linear(x, values, s)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    # dense fp32 reference
    v32 = values.detach().float().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    dense = torch.zeros(out_f, in_f).masked_scatter(mask, v32)
    y_ref = x32 @ dense.T
    y_ref.backward(dy.float())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol)
    torch.testing.assert_close(values.grad.float(), v32.grad, **tol)


def test_rosa_layer_equals_dense_sum_and_starts_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()  # base.weight holds W0 + S between GEMMs (held merge)
    layer = AdaptedLinear(base, 4, 8.0)
    x = torch.randn(5, 12)
    before = layer(x)
    mask = _mask(10, 12, 0.2, 3)
    layer.attach_mask(SparseStructure.from_dense_mask(mask))
    torch.testing.assert_close(layer(x), before)  # zero values: attaching changes nothing
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.sparse_values.normal_()
    s_dense = torch.zeros(10, 12).masked_scatter(mask, layer.sparse_values.detach())
    w = w0 + 2.0 * layer.lora_B @ layer.lora_A + s_dense
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), w - w0, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.frozen.read_full(keep=True), w0)  # the frozen weight reads as W0


def test_sparse_only_layer():
    base = nn.Linear(6, 4, bias=False)
    w0 = base.weight.detach().clone()
    layer = AdaptedLinear(base, 0, 1.0)
    assert not hasattr(layer, "lora_A")
    mask = _mask(4, 6, 0.5, 4)
    layer.attach_mask(SparseStructure.from_dense_mask(mask))
    with torch.no_grad():
        layer.sparse_values.fill_(0.5)
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), x @ (w0 + 0.5 * mask).T)


def test_mask_file_roundtrip_and_garbage(tmp_path):
    masks = {
        "a.q_proj": SparseStructure.from_dense_mask(_mask(9, 7, 0.3, 5)),
        "b.up_proj": SparseStructure.from_dense_mask(_mask(4, 11, 0.3, 6)),
    }
    save_masks(tmp_path / "m.safetensors", masks)
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.keys() == masks.keys()
    for k in masks:
        assert loaded[k].shape == masks[k].shape
        assert torch.equal(loaded[k].flat_indices(), masks[k].flat_indices())
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00garbage")
    with pytest.raises(UserError, match="cannot be read"):
        load_masks(tmp_path / "bad.safetensors")


def _as_if_partitioned(layer: AdaptedLinear) -> None:
    """Mark the base weight as ZeRO-3 partitioned (what ``zero_params.is_partitioned`` reads),
    so the layer takes the path it takes under ZeRO-3: a merged copy, never an in-place write."""
    layer.base.weight.ds_id = 0


def _run_path(layer: AdaptedLinear, path: str, x0: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and every adapter gradient of ``sum(y^2)`` on one sparse path:
    ``spmm``, ``in_place`` (``add`` on a whole weight) or ``copy`` (``add`` under ZeRO-3)."""
    from rosa_ds.kernels import sparse_linear as sl

    had = hasattr(layer.base.weight, "ds_id")
    if path == "copy":
        _as_if_partitioned(layer)
    try:
        sl.set_path("spmm" if path == "spmm" else "add")
        assert layer._merge_mode(x0) == {"spmm": None}.get(path, path)
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.float().pow(2).sum().backward()
        grads = [p.grad.clone() for p in layer.adapter_params().values()]
        return [y.detach(), x.grad, *grads]
    finally:
        sl.set_path("auto")
        if not had and hasattr(layer.base.weight, "ds_id"):
            del layer.base.weight.ds_id


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_add_paths_equal_spmm_path(bias):
    """Merging S into W (in place, or into a copy under ZeRO-3; one GEMM) computes what the
    separate sparse product does, and the two merges give the same bits."""
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(17, 33, bias=bias), 4, 8.0)
    layer.attach_mask(SparseStructure.from_dense_mask(_mask(33, 17, 0.2, 7)))
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.sparse_values.normal_()
    x0 = torch.randn(2, 5, 17)
    results = {path: _run_path(layer, path, x0) for path in ("spmm", "in_place", "copy")}
    for a, b in zip(results["spmm"], results["in_place"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    for a, b in zip(results["copy"], results["in_place"], strict=True):
        assert torch.equal(a, b)


def _held_layer(dtype: torch.dtype, seed: int = 0) -> AdaptedLinear:
    torch.manual_seed(seed)
    layer = AdaptedLinear(nn.Linear(24, 40), 2, 4.0).to(dtype)
    layer.attach_mask(SparseStructure.from_dense_mask(_mask(40, 24, 0.1, 3)))
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.sparse_values.copy_(1e-2 * torch.randn(layer.mask_nnz))
        layer.lora_B.normal_()
    return layer


def _merged_bits(w0: torch.Tensor, layer: AdaptedLinear) -> torch.Tensor:
    """``W0 + S`` summed in fp32 and rounded once to W's dtype: what the held merge writes."""
    s = layer.structure.to_dense(layer.sparse_values.detach().float())
    mask = layer.structure.to_dense(torch.ones(layer.mask_nnz)).bool()
    return torch.where(mask, (w0.float() + s).to(w0.dtype), w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_held_merge_keeps_w0_plus_s_in_w_and_gives_w0_to_every_reader(dtype):
    """The in-place path keeps ``S`` merged in ``W`` from one GEMM to the next: after a forward
    W holds ``W0 + S`` rounded once (the copying merge's bits, so the same outputs and
    gradients); a changed ``S`` is merged again from the saved ``W0`` (no rounding builds up);
    a forward that raised leaves it consistent; reading the frozen weight, moving the layer,
    another path or a new mask each put ``W0`` back first."""
    from rosa_ds.kernels import sparse_linear as sl

    layer = _held_layer(dtype)
    w0 = layer.base.weight.detach().clone()
    x0 = torch.randn(3, 24, dtype=dtype)
    assert layer._merge_mode(x0) == "in_place"
    y = layer(x0.clone().requires_grad_())
    assert torch.equal(layer.base.weight, _merged_bits(w0, layer))
    y.float().sum().backward()
    assert torch.equal(layer.base.weight, _merged_bits(w0, layer))
    for _ in range(3):  # optimizer-like updates: each merge starts again from W0
        with torch.no_grad():
            layer.sparse_values.add_(3e-3 * torch.randn(layer.mask_nnz, dtype=dtype))
            layer(x0)
        assert torch.equal(layer.base.weight, _merged_bits(w0, layer))
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 23, dtype=dtype))  # the GEMM fails after the merge
    assert torch.equal(layer.base.weight, _merged_bits(w0, layer))
    in_place, copy = _run_path(layer, "in_place", x0), _run_path(layer, "copy", x0)
    for a, b in zip(copy, in_place, strict=True):
        assert torch.equal(a, b)
    assert not sl.holds_merge(layer.base.weight)  # the copy path put W0 back before copying
    assert torch.equal(layer.base.weight, w0)
    layer(x0)
    assert torch.equal(layer.frozen.read_full(keep=True), w0.float())  # a reader gets W0
    assert torch.equal(layer.base.weight, w0)
    layer(x0)
    layer.float()  # a cast replaces the storage: W0 goes back first, then is cast
    assert torch.equal(layer.base.weight, w0.float())
    layer(x0.float())
    other = SparseStructure.from_dense_mask(_mask(40, 24, 0.1, 4))
    layer.attach_mask(other)  # a new mask: W0 at the old positions, nothing merged yet
    assert torch.equal(layer.base.weight, w0.float())


def test_a_held_merge_is_written_once_per_change_of_s(monkeypatch):
    """The point of holding the merge: forward and backward of several micro-batches with the
    same ``S`` merge once (four merges or restores per micro-batch when each GEMM merged for
    itself), and an update of ``S`` costs one more."""
    from rosa_ds.kernels import cpu_native
    from rosa_ds.kernels import sparse_linear as sl

    layer = _held_layer(torch.float32, seed=1)
    calls = []
    native = cpu_native.kernels()
    if native is not None:  # count the compiled kernel's writes into W

        class Counting:
            def __getattr__(self, name):
                fn = getattr(native, name)
                writes = name in ("merge_in_place", "write_merged", "restore")
                return lambda *a: (writes and calls.append(name)) or fn(*a)

        monkeypatch.setattr(cpu_native, "kernels", lambda: Counting())
    else:  # count torch's writes into W
        real = torch.Tensor.index_copy_
        monkeypatch.setattr(
            torch.Tensor, "index_copy_", lambda t, *a: calls.append("index_copy_") or real(t, *a)
        )
    x0 = torch.randn(4, 24)
    for _ in range(3):
        layer(x0.clone().requires_grad_()).sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        layer.sparse_values.add_(1e-3)
    layer(x0.clone().requires_grad_()).sum().backward()
    assert len(calls) == 2
    sl.release_merge(layer.base.weight)
    assert len(calls) == 3 and not sl.holds_merge(layer.base.weight)


def test_a_replaced_weight_storage_is_refused_not_written_into():
    """``weight.data = ...`` while ``S`` is held merged would leave the saved ``W0`` pointing
    at nothing: the next GEMM says so instead of writing into the new storage."""
    layer = _held_layer(torch.float32)
    layer(torch.randn(2, 24))
    layer.base.weight.data = layer.base.weight.data.clone()
    with pytest.raises(RuntimeError, match="storage was replaced"):
        layer(torch.randn(2, 24))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_held_merge_trains_like_the_copying_merge(dtype):
    """Six optimizer steps with two micro-batches each: the layer whose merge is held (written
    again once per step) follows the copying merge (ZeRO-3's path, a fresh ``W + S`` each
    GEMM) bit for bit, losses and values; a held merge that missed an update would not."""
    import copy

    from rosa_ds.kernels import sparse_linear as sl

    held = _held_layer(dtype, seed=2)
    copying = copy.deepcopy(held)
    _as_if_partitioned(copying)
    x = torch.randn(2, 6, 24, dtype=dtype)
    runs = {}
    sl.set_path("add")  # the copy even where the cost model would pick the sparse product
    try:
        for name, layer in (("held", held), ("copy", copying)):
            opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
            losses = []
            for _ in range(6):
                for micro in x:
                    loss = layer(micro).float().pow(2).mean()
                    loss.backward()
                    losses.append(loss.item())
                opt.step()
                opt.zero_grad()
            runs[name] = (losses, layer.sparse_values.detach().clone())
        modes = held._merge_mode(x[0]), copying._merge_mode(x[0])
    finally:
        sl.set_path("auto")
    assert modes == ("in_place", "copy")
    assert runs["held"][0] == runs["copy"][0]
    assert torch.equal(runs["held"][1], runs["copy"][1])


def test_a_forgotten_merge_lets_the_storage_go():
    """``Built.release`` empties a finished engine's weights: a held merge is dropped first, so
    neither its saved ``W0`` outlives the storage nor a later reader trips on the new one."""
    from rosa_ds.kernels import sparse_linear as sl

    layer = _held_layer(torch.float32)
    layer(torch.randn(2, 24))
    weight = layer.base.weight
    assert sl.holds_merge(weight)
    sl.forget_merge(weight)
    weight.data = torch.empty(0)
    assert not sl.holds_merge(weight)
    sl.release_merge(weight)  # nothing held: nothing written, no error


def test_a_weight_tied_to_another_module_is_never_held_merged():
    """An output layer tied to the embeddings: holding ``S`` in the shared weight would change
    the embeddings too, so such a layer merges into a copy instead."""
    from rosa_ds.adapters.inject import inject_adapters
    from rosa_ds.config import AdapterConfig

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 24)
            self.head = nn.Linear(24, 40, bias=False)
            self.head.weight = self.embed.weight
            self.proj = nn.Linear(24, 24)

    model = Tied()
    inject_adapters(model, AdapterConfig(rank=2, alpha=4.0, targets=["head", "proj"], exclude=[]))
    assert model.head.shares_weight and not model.proj.shares_weight
    model.head.attach_mask(SparseStructure.from_dense_mask(_mask(40, 24, 0.1, 3)))
    assert model.head._merge_mode(torch.randn(2, 24)) != "in_place"


@pytest.mark.parametrize("path", ["spmm", "add"])
def test_the_mask_is_read_again_in_backward_not_kept_from_forward(path):
    """Under ZeRO-3 a layer's mask indices exist whole only while DeepSpeed has them gathered
    (in forward, and again in backward): each sparse function must ask for the structure in
    both, holding no index array from one to the other. The layer's packed mask round-trips."""
    from rosa_ds.kernels import sparse_linear as sl

    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(17, 33), 4, 8.0)
    structure = SparseStructure.from_dense_mask(_mask(33, 17, 0.2, 8))
    layer.attach_mask(structure)
    layer.base.requires_grad_(False)
    assert layer.mask_index.dtype == torch.int32 and not layer.mask_index.requires_grad
    for name, tensor in structure.tensors().items():
        assert torch.equal(getattr(layer.read_mask(), name), tensor), name
    _as_if_partitioned(layer)  # ZeRO-3's paths: the sparse product, or a merged copy
    reads = []
    real = layer._structure_now
    layer._structure_now = lambda: reads.append(1) or real()
    try:
        sl.set_path(path)
        y = layer(torch.randn(2, 5, 17))
        assert len(reads) == 1
        y.sum().backward()
        assert len(reads) == 2 and layer.sparse_values.grad is not None
    finally:
        sl.set_path("auto")
    # a partitioned mask (ZeRO-3 outside a gather) cannot be read by mistake
    layer.mask_index.data = torch.empty(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="partitioned"):
        layer.structure  # noqa: B018


def test_the_cpu_merge_rounds_w_plus_s_once_in_bf16():
    """The CPU merge of ``S`` into a bf16 weight is the fp32 sum ``W + S`` rounded once, as the
    Triton kernel computes it (rounding ``S`` to bf16 first, then the sum, changed 20 of 1500
    entries). The Triton kernel itself cannot be checked here: its interpreter truncates fp32
    to bf16 where the GPU rounds to nearest."""
    from rosa_ds.kernels import torch_sparse
    from rosa_ds.kernels.csr import SparseStructure

    torch.manual_seed(0)
    w = (0.15 * torch.randn(64, 96)).bfloat16()
    s = SparseStructure.from_flat_indices(torch.randperm(64 * 96)[:1500], (64, 96))
    values = 1e-3 * torch.randn(s.nnz)
    merged = torch_sparse.sparse_add(w, values, s)
    assert torch.equal(merged, (w.float() + s.to_dense(values)).bfloat16())


def test_sparse_path_cost_model():
    from rosa_ds.kernels.sparse_linear import use_sparse_add

    assert use_sparse_add(nnz=100, numel=10_000, tokens=512)  # 51,200 > 10,000: merge
    assert not use_sparse_add(nnz=10, numel=10_000, tokens=8)  # tiny batch: sparse product


def test_in_bf16_the_merge_keeps_more_of_a_small_sparse_part_than_the_separate_product():
    """Why ``sparse_path=auto`` merges S into a bf16 weight too. Merged, an entry of S is lost
    where it is below half W's grid step (about |W_ij| / 256); added as a separate product,
    x S^T is lost where it is below half the output's grid step (about |y| / 256), and
    |y| = |x W^T| is far larger than |W_ij| while x S^T is only sqrt(density) of the scale.
    The least-squares slope of the output's move on the exact x S^T (1: all of S seen)."""
    from rosa_ds.kernels import sparse_linear as sl
    from rosa_ds.kernels.csr import SparseStructure

    torch.manual_seed(0)
    out_f, in_f, tokens = 256, 256, 256
    w = (0.15 * torch.randn(out_f, in_f)).bfloat16()  # SmolLM2-like weights
    x = torch.randn(tokens, in_f).bfloat16()
    s = SparseStructure.from_flat_indices(
        torch.randperm(out_f * in_f)[: out_f * in_f // 50], (out_f, in_f)
    )
    values = (3e-4 * torch.randn(s.nnz)).bfloat16()  # about one Adam step
    exact = x.float() @ s.to_dense(values.float()).T
    base = torch.nn.functional.linear(x, w)
    try:
        sl.set_path("add")
        merged = sl.sparse_add_linear(x, w, None, values, s)
    finally:
        sl.set_path("auto")
    separate = base + sl.sparse_linear(x, values, s).to(torch.bfloat16)

    def slope(y: torch.Tensor) -> float:
        moved = y.float() - base.float()
        return float((moved * exact).sum() / (exact * exact).sum())

    assert slope(merged) > 0.6  # measured 0.79 (0.84 at 576 x 576)
    assert slope(separate) < 0.5 * slope(merged)  # measured 0.18 (0.18)
