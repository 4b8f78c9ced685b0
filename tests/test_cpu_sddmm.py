"""The compiled CPU SDDMM (rosa_ds/kernels/csrc/sddmm_cpu.cpp) against the fp64 dense reference
and torch's sampled_addmm, its choice switch and its fallback."""

from __future__ import annotations

import pytest
import torch

from rosa_ds.errors import UserError
from rosa_ds.kernels import cpu_native, torch_sparse
from rosa_ds.kernels.csr import SparseStructure

needs_compiler = pytest.mark.skipif(
    cpu_native.compiler() is None, reason="no C++ compiler: the CPU SDDMM cannot be built here"
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
    mask[-1] = True  # a full row (more than four non-zeros, and a remainder of fewer)
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
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*sampled_addmm"):
        assert cpu_native.kernels() is None
    dy, x, s, reference = _case(20, 9, 11, 0.3, 4)
    torch.testing.assert_close(
        torch_sparse.sddmm(dy, x, s).double(), reference, rtol=1e-5, atol=1e-4
    )
    cpu_native.kernels.cache_clear()
    fresh_choice.setenv(cpu_native.ENV, "native")
    with pytest.raises(
        RuntimeError, match="ROSA_DS_CPU_SDDMM=native but the CPU SDDMM did not build"
    ):
        cpu_native.kernels()


def test_bad_choice_is_a_user_error(fresh_choice):
    fresh_choice.setenv(cpu_native.ENV, "fast")
    with pytest.raises(
        UserError, match="ROSA_DS_CPU_SDDMM='fast' is not one of auto, native, torch"
    ):
        cpu_native.kernels()
