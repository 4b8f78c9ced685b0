"""Sparse-adapter kernels against the dense GEMM of the same shape, on 7B shapes.

SpMM (``x S^T``), SDDMM (value gradient), sparse-add (``W + S`` as a new dense tensor, the
merge under ZeRO-3) and the in-place merge (``W0 + S`` written over ``W`` at the mask and ``W0``
written back, what one GEMM of a layer holding ``W`` whole costs extra) at densities 0.15%, 0.6% and
2.4% for 4096x4096, 4096x11008 and 11008x4096 weights and a few token counts, each against the
dense GEMM ``x W^T`` measured in the same run. On a GPU it times the Triton kernels and
``torch.sparse``; on a CPU it times the torch path (torch's CSR kernels), and the Triton figures
need a GPU; there the SDDMM is the compiled one where it builds (``rosa_ds/kernels/cpu_native.py``),
and torch's ``sampled_addmm`` is timed beside it. Two more SDDMMs for comparison: the dense
gradient ``dY^T X`` by a GEMM, then read at the mask (what any sparse SDDMM must beat), and on a
GPU the Triton SpMM and SDDMM reading their operands token-major as they come (one scattered
element per token and non-zero) instead of the feature-major copies they make by default. The
last line: ``spmm_vs_gemm=X sddmm_vs_gemm=Y add_vs_gemm=Z inplace_vs_gemm=W
dense_sddmm_vs_gemm=D`` (median ratios), on a GPU also ``token_major_spmm_vs_gemm=`` and
``token_major_sddmm_vs_gemm=``, on a CPU ``sampled_sddmm_vs_gemm=V``.

    python benchmarks/sparse_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_ds.kernels import torch_sparse  # noqa: E402
from rosa_ds.kernels.csr import SparseStructure  # noqa: E402
from rosa_ds.kernels.sparse_linear import merged_in_place  # noqa: E402


def merge_and_restore(w: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    with merged_in_place(w, values, positions):
        pass


def timed(fn, repeat: int, sync) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    ap.add_argument("--densities", default="0.0015,0.006,0.024")
    ap.add_argument("--tokens", default="256,1024")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        from rosa_ds.kernels import triton_sparse as ops

        label = "triton"
    else:
        from rosa_ds.kernels import cpu_native

        sddmm = "compiled SDDMM" if cpu_native.available() else "sampled_addmm SDDMM"
        ops, label = torch_sparse, f"torch CSR, {sddmm} (CPU)"
    print(f"device={device} dtype={dtype} kernels={label} threads={torch.get_num_threads()}")
    if not cuda:
        print("no GPU: these are the CPU path's figures; the Triton kernels need a GPU to time")
    # kernels timed beside those the training path runs: name -> fn(dy, x, s, positions, values)
    extras = {"dense_sddmm": lambda dy, x, s, p, v: (dy.T @ x).view(-1)[p]}
    if cuda:
        extras["token_major_spmm"] = lambda dy, x, s, p, v: ops.spmm(x, v, s, feature_major=False)
        extras["token_major_sddmm"] = lambda dy, x, s, p, v: ops.sddmm(dy, x, s, False)
    else:
        extras["sampled_sddmm"] = lambda dy, x, s, p, v: torch_sparse.sampled_sddmm(dy, x, s)
    ratios: dict[str, list[float]] = {k: [] for k in ("spmm", "sddmm", "add", "inplace", *extras)}
    g = torch.Generator().manual_seed(0)
    print(
        f"{'shape':>11} {'density':>8} {'tokens':>6} {'gemm ms':>9} "
        + " ".join(f"{k:>{max(7, len(k))}}" for k in ratios)
        + "   (time / gemm time)"
    )
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = torch.randn(out_f, in_f, generator=g).to(device, dtype)
        for density in (float(d) for d in args.densities.split(",")):
            numel = out_f * in_f
            flat = torch.randperm(numel, generator=g)[: round(density * numel)]
            s = SparseStructure.from_flat_indices(flat, (out_f, in_f))
            if cuda:
                s = s.to(device)
            values = torch.randn(s.nnz, generator=g).to(device, dtype)
            positions = s.flat_indices()
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
                dy = torch.randn(tokens, out_f, generator=g).to(device, dtype)
                gemm = timed(lambda x=x, w=w: x @ w.T, args.repeat, sync)
                t_spmm = timed(lambda x=x, s=s, v=values: ops.spmm(x, v, s), args.repeat, sync)
                t_sddmm = timed(lambda x=x, dy=dy, s=s: ops.sddmm(dy, x, s), args.repeat, sync)
                t_add = timed(lambda s=s, v=values, w=w: ops.sparse_add(w, v, s), args.repeat, sync)
                t_inplace = timed(
                    lambda p=positions, v=values, w=w: merge_and_restore(w, v, p),
                    args.repeat,
                    sync,
                )
                r = [t_spmm / gemm, t_sddmm / gemm, t_add / gemm, t_inplace / gemm]
                for fn in extras.values():
                    timed_fn = lambda fn=fn, dy=dy, x=x, s=s, p=positions, v=values: fn(  # noqa: E731
                        dy, x, s, p, v
                    )
                    r.append(timed(timed_fn, args.repeat, sync) / gemm)
                for key, value in zip(ratios, r, strict=True):
                    ratios[key].append(value)
                print(
                    f"{shape:>11} {density:>8.2%} {tokens:>6} {gemm * 1e3:>9.2f} "
                    + " ".join(f"{v:>{max(7, len(k))}.3f}" for k, v in zip(ratios, r, strict=True)),
                    flush=True,
                )
    print(" ".join(f"{k}_vs_gemm={statistics.median(v):.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
