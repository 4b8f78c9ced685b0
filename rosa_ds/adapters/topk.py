"""The global top-k of a score vector sharded over ranks, with traffic that does not grow with
the number of ranks.

Gathering every rank's top-k candidates costs each rank ``world x k`` values: at 512 GPUs and a
70B model that is about a terabyte per rank. Instead the ranks agree on the threshold, the k-th
largest score, by bisection over the bits of a float32 (non-negative floats order like their
bit patterns; 31 rounds), each round one all-reduce of a single count; then every rank picks its own
entries above the threshold, ties at the threshold go to the lowest flat indices (as a single
process's stable sort does), and only the chosen indices, k in all, are all-gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FLOAT32_INF_BITS = 0x7F800000


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _sum(value: int, device: torch.device) -> int:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def top_k_single(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (sorted) of the k largest non-negative scores, ties to the lower index;
    entries at -inf (padding) are never chosen. The reference for :func:`top_k_sharded`."""
    return _top_k(scores, k, 0, torch.device("cpu"), sharded=False)


def top_k_sharded(
    scores: torch.Tensor, k: int, offset: int, comm_device: torch.device
) -> torch.Tensor:
    """Every rank calls this with its shard of non-negative scores (padding at -inf), the
    shard's first flat index, and the same ``k``; every rank gets the same flat indices
    (sorted), the set :func:`top_k_single` chooses on the whole vector."""
    return _top_k(scores, k, offset, comm_device, sharded=_distributed())


def _top_k(
    scores: torch.Tensor, k: int, offset: int, comm_device: torch.device, sharded: bool
) -> torch.Tensor:
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    bits = scores.detach().float().contiguous().view(torch.int32)  # -inf: negative, never counted
    device = comm_device if sharded else scores.device

    def count_at_least(b: int) -> int:
        n = int((bits >= b).sum())
        return _sum(n, device) if sharded else n

    lo, hi = 0, FLOAT32_INF_BITS  # the largest lo with count(bits >= lo) >= k: the k-th score
    if count_at_least(0) < k:  # fewer candidates than k: take them all
        lo = 0
    else:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_at_least(mid) >= k:
                lo = mid
            else:
                hi = mid - 1
    above = torch.nonzero(bits > lo).flatten().cpu()
    tied = torch.nonzero(bits == lo).flatten().cpu()  # ascending index
    need = k - (_sum(above.numel(), device) if sharded else above.numel())
    before = 0
    if sharded:  # ranks hold increasing flat ranges: "lowest index first" is rank order
        counts = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        counts[dist.get_rank()] = tied.numel()
        dist.all_reduce(counts)
        before = int(counts[: dist.get_rank()].sum())
    take = max(0, min(tied.numel(), need - before))
    mine = torch.cat([above, tied[:take]]) + offset
    if not sharded:
        return torch.sort(mine).values
    # Everyone needs the whole mask: gather the chosen indices (k in all, padded to the largest).
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    sizes[dist.get_rank()] = mine.numel()
    dist.all_reduce(sizes)
    padded = torch.full((int(sizes.max()),), -1, dtype=torch.long, device=device)
    padded[: mine.numel()] = mine.to(device)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    chosen = torch.cat([p[: int(n)] for p, n in zip(parts, sizes.tolist(), strict=True)])
    return torch.sort(chosen.cpu()).values
