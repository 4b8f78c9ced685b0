"""Subspace adaptation (ROSA): merge, factorize, resample, by a sharded gather-factorize-scatter.

For each adapted matrix: ``W' = W + s B A``; ``U S V^T = svd(W')`` in fp32; ``r`` singular
triplets ``I`` are chosen (``random_block``: a contiguous block at a random offset, as the
reference code; ``random_subset``: a uniform subset, as the paper words it; ``top``;
``bottom``); ``W_fixed = W' - U_I S_I V_I^T`` becomes the frozen weight and ``U_I S_I V_I^T``
the new ``s B A`` (``balanced``: sqrt(S) on each factor; ``one_sided``: all of S on B, as the
reference). The model's function is unchanged by a resample up to rounding: exactly (to fp32
round-off) when the weights are fp32; in bf16, ``W_fixed`` and the factors are rounded to bf16
once more, which moves the logits by about bf16's precision.

Distributed, every matrix has an owner rank (chosen greedily to balance the SVD cost
``m n min(m, n)``); owners work in parallel, one matrix each per round: the owner gathers the
full weight (a ZeRO-3 gather, or the local copy under ZeRO-0/1/2), factorizes, decides the
indices, writes ``W_fixed`` back to where its shards live and broadcasts the new factors, which
every rank writes into DeepSpeed's fp32 master copy and the model copy. No rank keeps more than
the matrix it owns in a round.

With 4-bit frozen weights (``rosa_ds.quant``) the owner gathers the records and dequantizes them
to fp32, merges and factorizes as above, re-quantizes ``W_fixed`` and scatters the records; the
re-quantization changes the function by ``deq(q(W_fixed)) - W_fixed``, whose Frobenius norm the
owner measures and every rank receives (``ResampleReport.requant``). Across resamples these
errors add up: their sum bounds how far the frozen weights have drifted from exact arithmetic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.adapters.svd import robust_svd
from rosa_ds.dist import rank_world
from rosa_ds.zero_params import broadcast, read_full, write_trainable

SAMPLINGS = ("random_block", "random_subset", "top", "bottom")
SPLITS = ("balanced", "one_sided")


def choose_indices(n: int, r: int, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """``r`` of the ``n`` singular-value positions (sorted, descending-value order is 0..n-1)."""
    if sampling == "top":
        return torch.arange(r)
    if sampling == "bottom":
        return torch.arange(n - r, n)
    if sampling == "random_block":
        start = int(torch.randint(0, n - r + 1, (1,), generator=generator))
        return torch.arange(start, start + r)
    if sampling == "random_subset":
        return torch.sort(torch.randperm(n, generator=generator)[:r]).values
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


@dataclass
class Factorized:
    """One matrix after a resample: the new frozen weight, the new factors, the chosen indices."""

    w_fixed: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    indices: torch.Tensor


def resample_matrix(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    sampling: str,
    split: str,
    generator: torch.Generator,
) -> Factorized:
    """Merge, factorize (full SVD, fp32) and re-split one matrix; all maths in fp32."""
    merged = w.float() + scale * (b.float() @ a.float())
    u, s, vh = _svd(merged)
    r = a.shape[0]
    idx = choose_indices(s.numel(), r, sampling, generator)
    u_i, s_i, vh_i = u[:, idx], s[idx], vh[idx]
    chosen = (u_i * s_i) @ vh_i
    if split == "balanced":
        root = torch.sqrt(s_i / scale)
        new_b, new_a = u_i * root, root[:, None] * vh_i
    elif split == "one_sided":
        new_b, new_a = u_i * (s_i / scale), vh_i.clone()
    else:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return Factorized(merged - chosen, new_a.contiguous(), new_b.contiguous(), idx)


def _svd(m: torch.Tensor):
    """Full SVD that falls back to other drivers and fp64 if LAPACK does not converge."""
    return robust_svd(m, "merged weight")


def svd_cost(shape: tuple[int, int]) -> int:
    m, n = shape
    return m * n * min(m, n)


def assign_owners(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment of matrices to ranks by SVD cost."""
    load = [0] * world
    owners = {}
    for name in sorted(shapes, key=lambda n: (-svd_cost(shapes[n]), n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += svd_cost(shapes[name])
    return owners


def rounds(owners: dict[str, int], world: int) -> list[list[str]]:
    """Round j holds the j-th matrix of every rank (in assignment order)."""
    per_rank: list[list[str]] = [[] for _ in range(world)]
    for name in owners:  # insertion order = cost order
        per_rank[owners[name]].append(name)
    depth = max((len(x) for x in per_rank), default=0)
    return [[lst[j] for lst in per_rank if j < len(lst)] for j in range(depth)]


def _generator(seed: int, count: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + count * 7919 + index)


@dataclass
class ResampleReport:
    """What one resample of every matrix did: indices, owner ranks, time, 4-bit error."""

    count: int
    indices: dict[str, list[int]]
    owners: dict[str, int]
    seconds: float
    # 4-bit frozen weights: per matrix ``{"abs": ||deq(q(W_fixed)) - W_fixed||_F, "norm":
    # ||W_fixed||_F}``, the error the re-quantization of this resample added
    requant: dict[str, dict[str, float]] = field(default_factory=dict)

    def requant_summary(self) -> dict[str, float] | None:
        """Relative Frobenius re-quantization error of this resample: the worst and mean matrix,
        and over all matrices together (sqrt(sum abs^2) / sqrt(sum norm^2))."""
        if not self.requant:
            return None
        rel = [e["abs"] / e["norm"] if e["norm"] > 0 else 0.0 for e in self.requant.values()]
        abs2 = sum(e["abs"] ** 2 for e in self.requant.values())
        norm2 = sum(e["norm"] ** 2 for e in self.requant.values())
        return {
            "rel_max": max(rel),
            "rel_mean": sum(rel) / len(rel),
            "rel_total": (abs2 / norm2) ** 0.5 if norm2 > 0 else 0.0,
            "abs_max": max(e["abs"] for e in self.requant.values()),
        }


def resample_all(
    model: nn.Module,
    *,
    sampling: str,
    split: str,
    seed: int,
    count: int,
    has_optimizer: bool,
    single_owner: bool = False,
) -> ResampleReport:
    """Resample every low-rank adapter of ``model``; every rank calls this.

    ``single_owner`` gives every matrix to rank 0 (the one-rank baseline of the benchmark).
    """
    t0 = time.perf_counter()
    rank, world = rank_world()
    modules: dict[str, AdaptedLinear] = {n: m for n, m in adapted_modules(model).items() if m.rank}
    names = sorted(modules)
    index_of = {n: i for i, n in enumerate(names)}
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in names}
    owners = assign_owners(shapes, 1 if single_owner else world)
    indices: dict[str, list[int]] = {}
    requant: dict[str, dict[str, float]] = {}
    for batch in rounds(owners, world):
        results: dict[str, Factorized] = {}
        for name in batch:  # gather: every rank takes part, only the owner keeps a copy
            m, own = modules[name], owners[name] == rank
            w = m.frozen.read_full(keep=own)  # 4-bit: gathered and dequantized to fp32
            a = read_full(m.lora_A, master=has_optimizer, keep=own)
            b = read_full(m.lora_B, master=has_optimizer, keep=own)
            if own:
                results[name] = (w, a, b)
        for name, (w, a, b) in list(results.items()):  # factorize: owners in parallel
            m = modules[name]
            results[name] = resample_matrix(
                w, a, b, m.scale, sampling, split, _generator(seed, count, index_of[name])
            )
        for name in batch:  # scatter: W_fixed to its shards, factors to every rank
            m, owner = modules[name], owners[name]
            f = results.get(name)
            # 4-bit: re-quantized by the owner, which measures the error it adds
            err = m.frozen.write_full(f.w_fixed if f else None, owner)
            if m.frozen.lossy:  # the same kind on every rank
                e = broadcast(torch.tensor([err.abs, err.norm]) if f else None, (2,), owner)
                requant[name] = {"abs": float(e[0]), "norm": float(e[1])}
            r = m.rank
            a = broadcast(f.a if f else None, (r, m.in_features), owner)
            b = broadcast(f.b if f else None, (m.out_features, r), owner)
            idx = broadcast(f.indices.float() if f else None, (r,), owner)
            write_trainable(m.lora_A, a, has_optimizer=has_optimizer)
            write_trainable(m.lora_B, b, has_optimizer=has_optimizer)
            indices[name] = [int(i) for i in idx.tolist()]
    return ResampleReport(count, indices, owners, time.perf_counter() - t0, requant)


def lowrank_delta(
    delta: torch.Tensor, max_rank: int, rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` with ``B A ~= delta``, at the numerical rank (at most ``max_rank``)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    keep = int((s > rtol * (s[0] if s.numel() else 0)).sum()) if s.numel() else 0
    keep = max(1, min(keep, max_rank))
    root = torch.sqrt(s[:keep])
    return u[:, :keep] * root, root[:, None] * vh[:keep]


def effective_rank(delta: torch.Tensor, rtol: float = 1e-4) -> int:
    s = torch.linalg.svdvals(delta.float())
    return int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
