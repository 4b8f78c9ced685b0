"""Run a real ``rosa-ds train`` (as one rank of any launcher) and record the tensor memory of
every optimizer step, gradient-collection step and resample: what ``rosa_ds.plan`` predicts.

    python   tests/probes/memory_probe.py OUT.json train --config tiny-lora key=value ...
    torchrun --nproc_per_node 2 tests/probes/memory_probe.py OUT.json train ...

Each rank writes ``OUT.json`` with ``.rank<N>`` before the suffix for ranks above 0.

What is measured: bytes of tensor storage alive on this rank, the CPU analogue of
``torch.cuda.max_memory_allocated``. Before each window (an optimizer step, a resample) every
tensor reachable from Python (``gc``, plus each parameter's ``.grad``) is summed once per storage;
during the window the profiler's allocator events (``profile_memory``) give the running change,
whose maximum added to the first figure is the window's peak. Blocks allocated before a window
and freed inside it are not seen by the profiler, so a peak can only be overstated, by such
frees before the peak (small: the previous step's loss and buckets). Process RSS is not used:
it counts libraries loaded late, the allocator's cached and fragmented pages and mapped model
files, which no planner models and which vary between runs and machines.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def tensor_bytes(extra: list[torch.Tensor] | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from Python right now."""
    gc.collect()
    seen: dict[int, int] = {}

    def add(t: object) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if t.layout != torch.strided:  # sparse tensors: their component tensors
            for part in ("crow_indices", "col_indices", "values", "indices"):
                with contextlib.suppress(RuntimeError, AttributeError):
                    add(getattr(t, part)())
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()

    for obj in gc.get_objects():
        add(obj)
    for t in extra or []:
        add(t)
    return sum(seen.values())


def window_peak(prof) -> int:
    """Largest running sum of the allocator's events in a profiled window."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def measure_window(fn, *args, **kw) -> int:
    """Run ``fn`` and return the largest rise of allocated tensor bytes while it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kw)
    return window_peak(prof)


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.collecting = False
        self.shapes: list[list[int]] = []
        self.engine = None

    def grads(self) -> list[torch.Tensor]:
        # a weak reference: an engine the trainer replaced (RoSA's restart) must not stay alive
        engine = self.engine() if self.engine is not None else None
        if engine is None:
            return []
        return [p.grad for p in engine.module.parameters() if p.grad is not None]

    def measure(self, kind: str, fn, *args, **kw):
        from torch.profiler import ProfilerActivity, profile

        self.shapes = []
        before = tensor_bytes(self.grads())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn(*args, **kw)
        rise = window_peak(prof)
        del prof
        after = tensor_bytes(self.grads())
        tokens = max((s[0] * s[1] for s in self.shapes), default=0)
        seq = max((s[1] for s in self.shapes), default=0)
        self.records.append(
            {"kind": kind, "before": before, "peak": before + rise, "after": after,
             "seq": seq, "tokens": tokens}
        )  # fmt: skip
        return result


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    import rosa_ds.methods.subspace as S
    import rosa_ds.train as T
    from rosa_ds.adapters.masks import GradientCollector
    from rosa_ds.cli import run

    rec = Recorder()
    step_fn, collate_fn, resample_fn = T.optimizer_step, T.collate, S.resample_all
    start, stop = GradientCollector.start, GradientCollector.stop

    def optimizer_step(built, *args, **kw):
        rec.engine = weakref.ref(built.engine)
        kind = "collect" if rec.collecting else "step"
        return rec.measure(kind, step_fn, built, *args, **kw)

    def collate(batch, *args, **kw):
        out_batch = collate_fn(batch, *args, **kw)
        rec.shapes.append(list(out_batch["input_ids"].shape))
        return out_batch

    def resample_all(model, **kw):
        return rec.measure("resample", resample_fn, model, **kw)

    def collector_start(self):
        rec.collecting = True
        return start(self)

    def collector_stop(self):
        rec.collecting = False
        return stop(self)

    T.optimizer_step, T.collate, S.resample_all = optimizer_step, collate, resample_all
    GradientCollector.start, GradientCollector.stop = collector_start, collector_stop
    code = run(argv)
    rank = int(os.environ.get("RANK", "0"))
    path = out if rank == 0 else out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    path.write_text(json.dumps({"rank": rank, "records": rec.records}, indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
