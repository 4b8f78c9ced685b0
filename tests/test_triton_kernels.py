"""The Triton kernels against the dense torch reference: every kernel, forward and backward,
edge-case masks, ragged shapes, three dtypes. On a CUDA GPU they run compiled there; without one
Triton's interpreter runs them on the CPU (switched on before the kernel module is imported)."""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from rosa_ds.adapters.layer import AdaptedLinear  # noqa: E402
from rosa_ds.kernels import sparse_linear  # noqa: E402
from rosa_ds.kernels import triton_sparse as ts  # noqa: E402
from rosa_ds.kernels.csr import SparseStructure  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 5), (33, 17), (40, 70)]  # none divisible by the block sizes


def _mask(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < 0.2
    mask[0] = False  # empty row
    mask[1] = True  # full row
    mask[2] = False
    mask[2, in_f - 1] = True  # a single non-zero
    mask[:, 0] = False  # an empty column (empty row of the transpose)
    return mask


def _on(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_dense_reference(dtype, shape):
    out_f, in_f = shape
    mask = _mask(out_f, in_f, 0)
    s = SparseStructure.from_dense_mask(mask).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(s.nnz, generator=g).to(dtype)
    x = torch.randn(9, in_f, generator=g).to(dtype)
    dy = torch.randn(9, out_f, generator=g).to(dtype)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    dense = torch.zeros(out_f, in_f).masked_scatter(mask, values.float())
    values, x, dy, w, dense, mask = _on(values, x, dy, w, dense, mask)
    tol = _tol(dtype)
    for feature_major in (True, False):
        y = ts.spmm(x, values, s, feature_major)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), x.float() @ dense.T, **tol)
        dx = ts.spmm_t(dy, values, s, feature_major)
        torch.testing.assert_close(dx.float(), dy.float() @ dense, **tol)
    ref_dv = (dy.float().T @ x.float())[mask]
    for feature_major in (True, False):
        torch.testing.assert_close(ts.sddmm(dy, x, s, feature_major), ref_dv, **tol)
    torch.testing.assert_close(ts.sparse_add(w, values, s).float(), w.float() + dense, **tol)


@pytest.mark.parametrize("feature_major", [True, False])
def test_kernels_over_several_token_blocks(feature_major):
    """Tokens spanning three blocks (the last one partial), rows longer than one block of
    non-zeros: SDDMM, SpMM and the transposed SpMM give the dense reference in both operand
    layouts."""
    out_f, in_f, tokens = 5, 70, 2 * ts.BLOCK_T + 7
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    mask[0] = True  # a row of 70 non-zeros: three blocks of BLOCK_K
    mask[3, ::3] = True
    s = SparseStructure.from_dense_mask(mask).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(tokens, in_f, generator=g), torch.randn(tokens, out_f, generator=g)
    x, dy, mask = _on(x, dy, mask)
    got = ts.sddmm(dy, x, s, feature_major)
    torch.testing.assert_close(got, (dy.T @ x)[mask], rtol=1e-5, atol=1e-5)
    values = _on(torch.randn(s.nnz, generator=g))[0]
    dense = torch.zeros(out_f, in_f, device=values.device).masked_scatter(mask, values)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ts.spmm(x, values, s, feature_major), x @ dense.T, **tol)
    torch.testing.assert_close(ts.spmm_t(dy, values, s, feature_major), dy @ dense, **tol)


def test_single_nonzero_and_empty_mask():
    s = SparseStructure.from_flat_indices(torch.tensor([5]), (3, 4)).to(DEVICE)
    x, v = _on(torch.randn(2, 4), torch.tensor([2.0]))
    torch.testing.assert_close(ts.spmm(x, v, s), x @ s.to_dense(v).T)
    empty = SparseStructure.from_flat_indices(torch.zeros(0, dtype=torch.long), (3, 4)).to(DEVICE)
    assert torch.equal(ts.spmm(x, *_on(torch.zeros(0)), empty), *_on(torch.zeros(2, 3)))
    assert ts.sddmm(*_on(torch.randn(2, 3)), x, empty).numel() == 0


@pytest.mark.parametrize("path", ["spmm", "add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_layer_same_through_triton_and_torch(dtype, path):
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(17, 33), 4, 8.0)
    layer.attach_mask(SparseStructure.from_dense_mask(_mask(33, 17, 2)))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.sparse_values.normal_()
    layer.to(DEVICE, dtype)
    x0 = torch.randn(2, 5, 17).to(DEVICE, dtype)
    results = {}
    sparse_linear.set_path(path)
    for backend in ("torch", "triton"):
        sparse_linear.set_backend(backend)
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.float().pow(2).sum().backward()
        results[backend] = (y.detach().float(), x.grad.float(), layer.sparse_values.grad.float())
    sparse_linear.set_backend("auto")
    sparse_linear.set_path("auto")
    for a, b in zip(results["torch"], results["triton"], strict=True):
        # bf16 rounds each of the layer's three terms: compare at the tensor's own scale
        scale = float(a.abs().max()) if dtype != torch.float32 else 1.0
        torch.testing.assert_close(b / scale, a / scale, **_tol(dtype))


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU: the interpreter would take hours")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_match_dense_reference_on_a_real_layer_shape(dtype):
    """A SmolLM2 MLP projection (1536 x 576) at RoSA's density, 512 tokens: many blocks per row
    and per token tile, the grid sizes a training step launches."""
    g = torch.Generator().manual_seed(3)
    out_f, in_f, tokens = 1536, 576, 512
    mask = torch.rand(out_f, in_f, generator=g) < 0.006
    mask[7] = True  # one full row: the longest-row grid bound
    s = SparseStructure.from_dense_mask(mask).to(DEVICE)
    values = torch.randn(s.nnz, generator=g).to(dtype)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    dy = torch.randn(tokens, out_f, generator=g).to(dtype)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    dense = torch.zeros(out_f, in_f).masked_scatter(mask, values.float())
    values, x, dy, w, dense, mask = _on(values, x, dy, w, dense, mask)

    # sums over hundreds of bf16 products: compare at the output's scale
    def close(a, b):
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **_tol(dtype))

    close(ts.spmm(x, values, s), x.float() @ dense.T)
    close(ts.spmm_t(dy, values, s), dy.float() @ dense)
    close(ts.sddmm(dy, x, s), (dy.float().T @ x.float())[mask])
    close(ts.sparse_add(w, values, s), w.float() + dense)
