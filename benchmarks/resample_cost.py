"""Cost of one subspace resample of every adapted matrix of SmolLM2-135M, against a training
step, with 1 and 2 owner ranks measured in one 2-rank run (ZeRO-2).

The one-rank figure gives every matrix to rank 0 (the other rank only receives); the two-rank
figure balances owners by SVD cost so both factorize at once. The overhead is amortized over the
interval of the ``smollm2-subspace`` config (one epoch, as the reference). Last line:
``overhead=X speedup=Y`` (resample time / interval training time at 2 ranks; 1-rank / 2-rank
resample time).

    python benchmarks/resample_cost.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    if "RANK" not in os.environ:  # re-launch as 2 ranks
        torchrun = Path(sys.executable).parent / "torchrun"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        os.execve(
            str(torchrun), [str(torchrun), "--nproc_per_node=2", __file__, *sys.argv[1:]], env
        )
    import torch.distributed as dist

    from rosa_ds import precision
    from rosa_ds.adapters.resample import resample_all
    from rosa_ds.config import load_config
    from rosa_ds.engine import build_engine
    from rosa_ds.preflight import prepare
    from rosa_ds.tracking import quiet_libraries
    from rosa_ds.train import make_sampler, optimizer_step

    cfg = load_config("smollm2-subspace", ["output_dir=/tmp/unused", *sys.argv[1:]])
    cfg, _ = precision.resolve(cfg)  # auto: bf16 only where this machine computes it natively
    prep = prepare(cfg, resume=None, training=False)
    quiet_libraries()
    built = build_engine(cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=True)
    p = built.placement
    sampler = make_sampler(cfg, prep, built)
    step_times = []
    for i in range(6):
        dist.barrier()
        t0 = time.perf_counter()
        optimizer_step(built, prep, sampler, i)
        dist.barrier()
        if i >= 1:
            step_times.append(time.perf_counter() - t0)
    times = {"one": [], "two": []}
    sub = cfg.adapter.subspace
    for count, mode in enumerate(["one", "two", "one", "two"]):
        dist.barrier()
        t0 = time.perf_counter()
        resample_all(
            built.model,
            sampling=sub.sampling,
            split=sub.split,
            seed=cfg.seed,
            count=count,
            has_optimizer=True,
            single_owner=mode == "one",
        )
        dist.barrier()
        times[mode].append(time.perf_counter() - t0)
    if p.rank != 0:
        return
    step = statistics.median(step_times)
    one, two = min(times["one"]), min(times["two"])
    interval = cfg.adapter.resample_every * (sampler.steps_per_epoch if sub.unit == "epochs" else 1)
    n = sum(1 for n, _ in built.model.named_modules() if n.endswith(("proj",)))
    print(
        f"model={cfg.model.name_or_path} matrices={n} ranks=2 zero=2 "
        f"threads={torch.get_num_threads()} step={step:.2f}s"
    )
    print(f"resample, 1 owner rank: {one:.2f} s ({one / step:.1f} steps)")
    print(f"resample, 2 owner ranks: {two:.2f} s ({two / step:.1f} steps)")
    print(f"interval: every {cfg.adapter.resample_every} {sub.unit} = {interval} steps")
    print(
        f"resample_s_1={one:.2f} resample_s_2={two:.2f} step_s={step:.2f} "
        f"overhead={two / (interval * step):.4f} speedup={one / two:.2f}"
    )


if __name__ == "__main__":
    main()
