"""The low-rank update's autograd function: the maths of ``y + s (h Aᵀ) Bᵀ`` and its four
gradients, in the transposed product orientations it computes them in."""

import pytest
import torch
import torch.nn.functional as F

from rosa_ds.kernels.low_rank import LowRankAdd, low_rank_add


def _inputs(tokens, inp, out, rank, dtype=torch.float64, y_dtype=None):
    g = torch.Generator().manual_seed(tokens * 7 + rank)
    y = torch.randn(tokens, out, generator=g).to(y_dtype or dtype).requires_grad_()
    h = torch.randn(tokens, inp, generator=g, dtype=dtype, requires_grad=True)
    a = torch.randn(rank, inp, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out, rank, generator=g, dtype=dtype, requires_grad=True)
    return y, h, a, b


@pytest.mark.parametrize("rank", [1, 4, 8, 16])
@pytest.mark.parametrize("shape", [(6, 5, 7), (9, 11, 3)])
def test_gradients_pass_gradcheck(rank, shape):
    """Finite differences in float64 against the backward's formulas, every input at once."""
    inputs = _inputs(*shape, rank)
    assert torch.autograd.gradcheck(lambda *t: LowRankAdd.apply(*t, 1.75), inputs)


@pytest.mark.parametrize("rank", [4, 8, 32])
def test_matches_autograd_of_the_two_linear_maps(rank):
    """Output and every gradient equal those of ``y + s F.linear(F.linear(h, A), B)``, the
    composition it replaces, on a layer-sized fp32 problem."""
    ours = _inputs(64, 48, 80, rank, dtype=torch.float32)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    dy = torch.randn(64, 80)
    out = low_rank_add(*ours, 2.0)
    expected = ref[0] + 2.0 * F.linear(F.linear(ref[1], ref[2]), ref[3])
    # fp32 sums in another order: differences at rounding level of values about 40 in size
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    out.backward(dy)
    expected.backward(dy)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-4)
    assert ours[3].grad.is_contiguous()  # DeepSpeed flattens gradients: B's must be plain


def test_leading_dimensions_are_kept():
    y, h, a, b = _inputs(12, 5, 7, 3)
    out = low_rank_add(y.reshape(3, 4, 7), h.reshape(3, 4, 5), a, b, 0.5)
    assert out.shape == (3, 4, 7)
    torch.testing.assert_close(out.reshape(12, 7), y + 0.5 * h @ a.T @ b.T)


def test_an_output_of_another_dtype_gets_the_update_cast_and_its_gradient_as_is():
    """A bf16 base output under fp32 adapters: the update is computed in fp32 and cast once;
    ``y``'s gradient is the incoming one, the adapters' come in fp32."""
    y, h, a, b = _inputs(16, 8, 6, 4, dtype=torch.float32, y_dtype=torch.bfloat16)
    out = low_rank_add(y, h, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, y + (2.0 * h @ a.T @ b.T).to(torch.bfloat16))
    dy = torch.randn(16, 6).to(torch.bfloat16)
    out.backward(dy)
    assert y.grad.dtype == torch.bfloat16 and torch.equal(y.grad, dy)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, 2.0 * dy.float().T @ (h @ a.T).detach())


def test_inputs_that_need_no_gradient_get_none():
    y, h, a, b = _inputs(6, 5, 7, 2)
    y.requires_grad_(False)
    h.requires_grad_(False)
    low_rank_add(y, h, a, b, 1.0).sum().backward()
    assert y.grad is None and h.grad is None
    assert a.grad is not None and b.grad is not None


def test_autocast_gives_the_old_compositions_dtypes_and_gradients():
    """Under bf16 autocast (DeepSpeed's ``torch_autocast`` turns it on around forward) backward
    runs as forward did: the output keeps ``y``'s dtype and every gradient matches autograd of
    the composition it replaces, in the inputs' dtypes."""
    ours = _inputs(32, 24, 40, 4, dtype=torch.float32)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_add(*ours, 2.0)
        expected = ref[0] + (2.0 * F.linear(F.linear(ref[1], ref[2]), ref[3])).to(ref[0].dtype)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-1)
    dy = torch.randn(32, 40)
    out.backward(dy)
    expected.backward(dy)
    for got, want in zip(ours, ref, strict=True):
        assert got.grad.dtype == want.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=5e-1)
