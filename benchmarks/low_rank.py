"""The low-rank update's forward and backward on one layer's shapes: ``rosa_ds``'s
``LowRankAdd`` against autograd of ``y + s · F.linear(F.linear(h, A), B)`` (what it replaced,
and how PEFT computes LoRA), at several ranks, alternating the two in one run so that machine
noise hits both alike. The last line gives the summed median times and their ratio.

    python benchmarks/low_rank.py                      # SmolLM2-135M's shapes, 512 tokens
    python benchmarks/low_rank.py --ranks 4 8 16 32 --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_ds.kernels.low_rank import low_rank_add  # noqa: E402

# (in, out) of SmolLM2-135M's adapted layers: q and o, k and v, gate and up, down
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def autograd_lora(y, h, a, b, scale):
    return y + scale * F.linear(F.linear(h, a), b)


def step_ms(fn, y, h, a, b, scale, dy) -> float:
    t0 = time.perf_counter()
    fn(y, h, a, b, scale).backward(dy)
    elapsed = time.perf_counter() - t0
    for t in (y, h, a, b):
        t.grad = None
    return elapsed * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for name in ("tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.ranks) < 1:
        ap.error(f"--ranks must all be at least 1, got {min(args.ranks)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    total = {"autograd": 0.0, "low_rank_add": 0.0}
    print(f"tokens={args.tokens} threads={args.threads} dtype=fp32; median ms, forward+backward")
    for rank in args.ranks:
        per_rank = {k: 0.0 for k in total}
        for inp, out in SHAPES:
            y = torch.randn(args.tokens, out, requires_grad=True)
            h = torch.randn(args.tokens, inp, requires_grad=True)
            a = torch.randn(rank, inp, requires_grad=True)
            b = torch.randn(out, rank, requires_grad=True)
            dy = torch.randn(args.tokens, out)
            fns = {"autograd": autograd_lora, "low_rank_add": low_rank_add}
            times = {k: [] for k in fns}
            for i in range(args.reps + 3):
                for k in fns if i % 2 == 0 else reversed(fns):
                    ms = step_ms(fns[k], y, h, a, b, 2.0, dy)
                    if i >= 3:
                        times[k].append(ms)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in total:
                per_rank[k] += med[k]
            print(
                f"r={rank:3d} in={inp:5d} out={out:5d}: autograd {med['autograd']:.3f} ms, "
                f"low_rank_add {med['low_rank_add']:.3f} ms",
                flush=True,
            )
        print(
            f"r={rank}: all shapes autograd {per_rank['autograd']:.2f} ms, "
            f"low_rank_add {per_rank['low_rank_add']:.2f} ms "
            f"(ratio {per_rank['low_rank_add'] / per_rank['autograd']:.3f})"
        )
        for k in total:
            total[k] += per_rank[k]
    print(
        f"autograd_ms={total['autograd']:.2f} low_rank_add_ms={total['low_rank_add']:.2f} "
        f"ratio={total['low_rank_add'] / total['autograd']:.3f}"
    )


if __name__ == "__main__":
    main()
