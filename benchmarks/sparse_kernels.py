"""Sparse-adapter kernels against the dense GEMM of the same shape, on 7B shapes.

SpMM (``x S^T``), SDDMM (value gradient), sparse-add (``W + S`` as a new dense tensor, the
merge under ZeRO-3) and the in-place merge (``W0 + S`` written over ``W`` at the mask and ``W0``
written back, what one GEMM of a layer holding ``W`` whole costs extra) at densities 0.15%, 0.6% and
2.4% for 4096x4096, 4096x11008 and 11008x4096 weights and a few token counts, each against the
dense GEMM ``x W^T`` measured in the same run. On a GPU it times the Triton kernels and
``torch.sparse``; on a CPU it times the torch path (torch's CSR kernels), and the Triton figures
need a GPU; there the SDDMM is the compiled one where it builds (``rosa_ds/kernels/cpu_native.py``),
and torch's ``sampled_addmm`` is timed beside it. The last line: ``spmm_vs_gemm=X
sddmm_vs_gemm=Y add_vs_gemm=Z inplace_vs_gemm=W`` (median ratios), on a CPU also
``sampled_sddmm_vs_gemm=V``.

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
    ratios: dict[str, list[float]] = {"spmm": [], "sddmm": [], "add": [], "inplace": []}
    if not cuda:
        ratios["sampled_sddmm"] = []
    g = torch.Generator().manual_seed(0)
    print(
        f"{'shape':>11} {'density':>8} {'tokens':>6} {'gemm ms':>9} {'spmm':>7} {'sddmm':>7} "
        f"{'add':>7} {'inplace':>7}"
        + ("" if cuda else f" {'sampled':>7}")
        + "   (sparse time / gemm time)"
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
                if not cuda:
                    sampled = lambda x=x, dy=dy, s=s: torch_sparse.sampled_sddmm(dy, x, s)  # noqa: E731
                    r.append(timed(sampled, args.repeat, sync) / gemm)
                for key, value in zip(ratios, r, strict=True):
                    ratios[key].append(value)
                print(
                    f"{shape:>11} {density:>8.2%} {tokens:>6} {gemm * 1e3:>9.2f} "
                    + " ".join(f"{v:>7.3f}" for v in r),
                    flush=True,
                )
    print(" ".join(f"{k}_vs_gemm={statistics.median(v):.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
