"""The compiled CPU kernels (rosa_ds/kernels/csrc/sparse_cpu.cpp): the SDDMM against the fp64
dense reference and torch's sampled_addmm, the in-place merge against torch's index ops bit for
bit, the choice switch and the fallback."""

from __future__ import annotations

import pytest
import torch

from rosa_ds.errors import UserError
from rosa_ds.kernels import cpu_native, torch_sparse
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.kernels.sparse_linear import merged_in_place

needs_compiler = pytest.mark.skipif(
    cpu_native.compiler() is None, reason="no C++ compiler: the CPU kernels cannot be built here"
)


@pytest.fixture
def fresh_choice(monkeypatch):
    """``cpu_native.kernels`` decided anew for this test (and again after it)."""
    cpu_native.kernels.cache_clear()
    yield monkeypatch
    cpu_native.kernels.cache_clear()


def _case(tokens: int, out_f: int, in_f: int, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0] = False  # an empty row
    mask[-1] = True  # a full row (passes of eight non-zeros, then of four and of one)
    s = SparseStructure.from_dense_mask(mask)
    dy = torch.randn(tokens, out_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g)
    reference = (dy.double().T @ x.double())[mask]
    return dy, x, s, reference


# tokens: fewer than one block, several whole blocks, a short last block; features: multiples
# of the 8x8 tiles and not; bf16 operands are widened exactly, so their fp64 product is the
# reference
@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,out_f,in_f", [(5, 7, 9), (64, 16, 24), (200, 33, 70), (128, 96, 40), (129, 8, 8)]
)
def test_compiled_sddmm_matches_the_dense_reference(tokens, out_f, in_f, dtype):
    native = cpu_native.kernels()
    assert native is not None
    dy, x, s, _ = _case(tokens, out_f, in_f, 0.3, tokens + out_f)
    dy, x = dy.to(dtype), x.to(dtype)
    reference = (dy.double().T @ x.double())[s.to_dense(torch.ones(s.nnz)) != 0]
    got = native.sddmm(dy, x, s.row_ptr, s.col_idx)
    assert got.dtype == torch.float32 and got.shape == (s.nnz,)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)
    sampled = torch_sparse.sampled_sddmm(dy, x, s).float()
    torch.testing.assert_close(got, sampled, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_path_sddmm_takes_half_precision_operands(dtype):
    dy, x, s, _ = _case(70, 24, 40, 0.2, 3)
    dy, x = dy.to(dtype), x.to(dtype)
    exact = (dy.double().T @ x.double())[s.to_dense(torch.ones(s.nnz)) != 0]
    got = torch_sparse.sddmm(dy, x, s)  # fp16 goes through an fp32 copy, bf16 straight in
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)


@needs_compiler
def test_compiled_sddmm_empty_mask_and_no_tokens():
    native = cpu_native.kernels()
    empty = SparseStructure.from_dense_mask(torch.zeros(6, 5, dtype=torch.bool))
    assert (
        native.sddmm(torch.randn(9, 6), torch.randn(9, 5), empty.row_ptr, empty.col_idx).numel()
        == 0
    )
    _, _, s, _ = _case(4, 6, 5, 0.5, 0)
    got = native.sddmm(torch.zeros(0, 6), torch.zeros(0, 5), s.row_ptr, s.col_idx)
    assert torch.equal(got, torch.zeros(s.nnz))


@needs_compiler
def test_compiled_sddmm_rejects_wrong_operands():
    native = cpu_native.kernels()
    dy, x, s, _ = _case(10, 8, 6, 0.5, 1)
    with pytest.raises(RuntimeError, match="share T"):
        native.sddmm(dy, x[:5], s.row_ptr, s.col_idx)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        native.sddmm(dy, x.bfloat16(), s.row_ptr, s.col_idx)
    with pytest.raises(RuntimeError, match="int32"):
        native.sddmm(dy, x, s.row_ptr.long(), s.col_idx.long())
    with pytest.raises(RuntimeError, match="out \\+ 1"):
        native.sddmm(dy[:, :4].contiguous(), x, s.row_ptr, s.col_idx)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.sddmm(dy, x.T.contiguous().T, s.row_ptr, s.col_idx)


def test_torch_choice_keeps_sampled_addmm(fresh_choice):
    fresh_choice.setenv(cpu_native.ENV, "torch")
    assert cpu_native.kernels() is None
    dy, x, s, reference = _case(33, 12, 10, 0.3, 2)
    torch.testing.assert_close(
        torch_sparse.sddmm(dy, x, s).double(), reference, rtol=1e-5, atol=1e-4
    )


def test_failed_build_falls_back_with_one_warning_or_fails_when_required(fresh_choice):
    fresh_choice.setenv("CXX", "no-such-compiler-rosa-ds")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*sampled_addmm and index ops"):
        assert cpu_native.kernels() is None
    dy, x, s, reference = _case(20, 9, 11, 0.3, 4)
    torch.testing.assert_close(
        torch_sparse.sddmm(dy, x, s).double(), reference, rtol=1e-5, atol=1e-4
    )
    cpu_native.kernels.cache_clear()
    fresh_choice.setenv(cpu_native.ENV, "native")
    with pytest.raises(
        RuntimeError, match="ROSA_DS_CPU_KERNELS=native but the CPU kernels did not build"
    ):
        cpu_native.kernels()


def test_bad_choice_is_a_user_error(fresh_choice):
    fresh_choice.setenv(cpu_native.ENV, "fast")
    with pytest.raises(
        UserError, match="ROSA_DS_CPU_KERNELS='fast' is not one of auto, native, torch"
    ):
        cpu_native.kernels()


def _merge_case(dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 53, generator=g).to(dtype)
    positions = torch.randperm(w.numel(), generator=g)[:300].sort().values
    values = torch.randn(300, generator=g) * 1e-2  # sums that round on the bf16/fp16 grid
    return w, values, positions


def _merged_under(choice: str, monkeypatch, w, values, positions):
    """``W + S`` as ``merged_in_place`` forms it with ``ROSA_DS_CPU_KERNELS=choice``, and ``W``
    after the block."""
    monkeypatch.setenv(cpu_native.ENV, choice)
    cpu_native.kernels.cache_clear()
    w = w.clone()
    with merged_in_place(w, values, positions):
        inside = w.clone()
    return inside, w


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_merge_gives_torch_merges_bits_and_restores_w(dtype, fresh_choice):
    w, values, positions = _merge_case(dtype, 5)
    native_inside, native_after = _merged_under("native", fresh_choice, w, values, positions)
    torch_inside, torch_after = _merged_under("torch", fresh_choice, w, values, positions)
    assert torch.equal(native_inside, torch_inside)
    assert torch.equal(native_after, w) and torch.equal(torch_after, w)
    assert not torch.equal(native_inside, w)  # the merge did change W inside the block


@needs_compiler
def test_compiled_merge_restores_w_when_the_block_raises(fresh_choice):
    fresh_choice.setenv(cpu_native.ENV, "native")
    w, values, positions = _merge_case(torch.bfloat16, 6)
    before = w.clone()
    with pytest.raises(ValueError, match="inside"), merged_in_place(w, values, positions):
        raise ValueError("inside")
    assert torch.equal(w, before)


@needs_compiler
def test_compiled_merge_rejects_wrong_operands():
    native = cpu_native.kernels()
    w, values, positions = _merge_case(torch.float32, 7)
    flat = w.view(-1)
    with pytest.raises(RuntimeError, match="int64"):
        native.merge_in_place(flat, values, positions.int())
    with pytest.raises(RuntimeError, match="float32"):
        native.merge_in_place(flat, values.double(), positions)
    with pytest.raises(RuntimeError, match="one value per position"):
        native.merge_in_place(flat, values[:5], positions)
    with pytest.raises(RuntimeError, match="its dtype"):
        native.restore(flat, values.bfloat16(), positions)
    before = w.clone()
    outside = positions.clone()
    outside[-1] = w.numel()  # one past the end: raises before anything is written
    with pytest.raises(RuntimeError, match="position 1961 is outside the weight"):
        native.merge_in_place(flat, values, outside)
    assert torch.equal(w, before)
    with pytest.raises(RuntimeError, match="outside the weight"):
        native.restore(flat, values, -1 - positions)
    assert torch.equal(w, before)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_merge_again_from_saved_w0_gives_torch_bits(dtype, fresh_choice):
    """``write_merged`` (a held merge after ``S`` changed): ``W0 + S`` from the saved ``W0``,
    summed in fp32 and rounded once, as torch's ops form it; a bad position writes nothing."""
    fresh_choice.setenv(cpu_native.ENV, "native")
    native = cpu_native.kernels()
    w, values, positions = _merge_case(dtype, 8)
    saved = w.view(-1)[positions].clone()
    merged = w.clone()
    native.write_merged(merged.view(-1), saved, values, positions)
    expected = w.clone()
    expected.view(-1).index_copy_(0, positions, (saved.float() + values).to(dtype))
    assert torch.equal(merged, expected) and not torch.equal(merged, w)
    outside = positions.clone()
    outside[0] = -1
    before = merged.clone()
    with pytest.raises(RuntimeError, match="outside the weight"):
        native.write_merged(merged.view(-1), saved, values, outside)
    assert torch.equal(merged, before)
    with pytest.raises(RuntimeError, match="one value and one saved value"):
        native.write_merged(merged.view(-1), saved[:3], values, positions)
