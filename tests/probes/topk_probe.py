"""Run under torchrun: the sharded top-k against a single process's, on scores full of ties.

torchrun --nproc_per_node 2 tests/probes/topk_probe.py OUT.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rosa_ds.adapters.topk import top_k_sharded, top_k_single  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for n, levels in ((1001, 5), (64, 1000), (7, 2)):
        scores = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(n)).float()
        shard = math.ceil(n / world)
        mine = torch.full((shard,), -math.inf)
        part = scores[rank * shard : (rank + 1) * shard]
        mine[: part.numel()] = part
        for k in sorted({0, 1, 3, n // 3, n // 2, n}):
            got = top_k_sharded(mine, k, rank * shard, torch.device("cpu"))
            want = top_k_single(scores, k)
            results[f"{n}/{levels}/{k}"] = [got.tolist(), want.tolist()]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
