"""Memory of 4-bit frozen weights on SmolLM2-135M-Instruct: bytes per parameter of the frozen
weights at 1 and 2 ranks (ZeRO-3), the peak memory of a training step in bf16 against 4-bit,
and the re-quantization error of ROSA resampling over 10 resamples.

Every figure comes from its own process (or pair of ranks), so nothing one configuration
allocated is counted against another:

- bytes per parameter: the quantized records each rank holds (``ds_tensor`` under ZeRO-3),
  divided by the number of weights they stand for;
- step peak (the figure of ``ratio``): bytes of tensor storage alive at the step's peak, the CPU
  analogue of ``torch.cuda.max_memory_allocated``: every tensor storage reachable from Python
  before the step (``gc``), plus the highest running sum of the allocator's events during the
  step (``torch.profiler`` with ``profile_memory``). Also shown: the process's resident-set
  high-water mark over the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
  which adds the libraries, allocator caches and mapped files that both runs share;
- re-quantization error: per resample, ``||deq(q(W_fixed)) - W_fixed||_F / ||W_fixed||_F`` over
  all adapted matrices together (and the worst matrix), as the trainer logs it, with one
  optimizer step between resamples.

Last line: ``ratio=X`` (4-bit / bf16 step peak, tensor bytes) with the other key figures.

    python benchmarks/memory.py [--steps 2] [--resamples 10] [--resample-targets attention]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.name_or_path=builtin:smollm2-135m-instruct"]
STEP = [
    *MODEL,
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "data.max_length=128",
    "adapter.dropout=0.0",
    "train.precision=bf16",
]
ATTENTION = "adapter.targets=[q_proj,k_proj,v_proj,o_proj]"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("HF_DATASETS_OFFLINE", "1")
    e.setdefault("ROSA_DS_CACHE", str(REPO / ".cache" / "rosa-ds"))
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import torch

    if not torch.cuda.is_available():
        e.setdefault("DS_ACCELERATOR", "cpu")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


# --- measuring ------------------------------------------------------------------------------


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python (and parameters' grads)."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is None or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def rss_hwm_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measured_step(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    before = tensor_bytes()
    reset = rss_hwm_reset()
    rss_before = rss_kib("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    total = rise = 0
    for e in events:
        total += e.nbytes()
        rise = max(rise, total)
    hwm = rss_kib("VmHWM") if reset else 0
    return {
        "tensor_before": before,
        "tensor_peak": before + rise,
        "rss_before": rss_before * 1024,
        "rss_peak": hwm * 1024,
    }


# --- children -------------------------------------------------------------------------------


def _build(overrides: list[str]):
    from rosa_ds import precision
    from rosa_ds.config import load_config
    from rosa_ds.engine import build_engine
    from rosa_ds.preflight import prepare
    from rosa_ds.train import quiet_libraries

    cfg = load_config("smollm2-lora", ["output_dir=/tmp/rosa-ds-memory-bench", *overrides])
    cfg, _ = precision.resolve(cfg)
    prep = prepare(cfg, resume=None, training=False)
    quiet_libraries()
    built = build_engine(cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=True)
    return cfg, prep, built


def frozen_figures(model) -> dict[str, float]:
    """Bytes of the adapted layers' frozen weights this rank holds, per weight they stand for."""
    from rosa_ds.adapters.inject import adapted_modules
    from rosa_ds.quant.load import frozen_bytes

    fb = frozen_bytes(model)
    if fb["params"]:
        return fb | {"bytes_per_param": fb["local"] / fb["params"]}
    local = params = 0
    for m in adapted_modules(model).values():
        w = m.base.weight
        n = w.ds_numel if hasattr(w, "ds_numel") else w.numel()
        held = w.ds_tensor.numel() if hasattr(w, "ds_tensor") else w.numel()
        local += held * w.element_size()
        params += n
    return {"local": local, "params": params, "bytes_per_param": local / params}


def child_step(args) -> dict:
    from rosa_ds.train import make_sampler, optimizer_step

    cfg, prep, built = _build([*STEP, f"quant.bits={args.bits}"])
    sampler = make_sampler(cfg, prep, built)
    optimizer_step(built, prep, sampler, 0)  # warm-up: optimizer state, buffers
    peaks = []
    for i in range(1, args.steps + 1):
        peaks.append(measured_step(lambda i=i: optimizer_step(built, prep, sampler, i)))
    worst = max(peaks, key=lambda r: r["tensor_peak"])
    return {"bits": args.bits, **worst, "frozen": frozen_figures(built.model)}


def child_shard(args) -> dict:
    import torch.distributed as dist

    _, _, built = _build(
        [*STEP, "quant.bits=4", "deepspeed.config=zero3", "train.global_batch_size=4"]
    )
    mine = frozen_figures(built.model)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"world": dist.get_world_size(), "ranks": every}


def child_resample(args) -> dict:
    from rosa_ds.adapters.resample import resample_all
    from rosa_ds.train import make_sampler, optimizer_step
    from rosa_ds.zero_params import reset_optimizer_group

    targets = [ATTENTION] if args.resample_targets == "attention" else []
    cfg, prep, built = _build(
        [*STEP, "quant.bits=4", "adapter.resample_every=1", "train.lr=1e-3", *targets]
    )
    sampler = make_sampler(cfg, prep, built)
    errors = []
    for count in range(args.resamples):
        optimizer_step(built, prep, sampler, count)
        report = resample_all(
            built.model,
            sampling="random_block",
            split="balanced",
            seed=cfg.seed,
            count=count,
            has_optimizer=True,
        )
        reset_optimizer_group(built.engine, 0)
        s = report.requant_summary()
        s["abs_sum"] = sum(e["abs"] for e in report.requant.values())
        errors.append(s)
        print(f"resample {count + 1}: rel_total={s['rel_total']:.4f}", file=sys.stderr)
    return {"matrices": len(report.requant), "errors": errors}


CHILDREN = {"step": child_step, "shard": child_shard, "resample": child_resample}


def run_child(kind: str, args, extra: list[str], nproc: int = 1) -> dict:
    out = Path(f"/tmp/rosa-ds-memory-{kind}-{os.getpid()}.json")
    me = [str(Path(__file__).resolve()), "--child", kind, "--out", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [torchrun, f"--nproc_per_node={nproc}", f"--master_port={port}", *me]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    ap.add_argument("--resamples", type=int, default=10)
    ap.add_argument(
        "--resample-targets",
        choices=["attention", "all-linear"],
        default="attention",
        help="adapted layers of the resampling run (attention: the ROSA paper's choice, quick)",
    )
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return
    common = ["--steps", str(args.steps)]
    mib = 1 / 2**20
    bf16 = run_child("step", args, [*common, "--bits", "16"])
    q4 = run_child("step", args, [*common, "--bits", "4"])
    shard = run_child("shard", args, [], nproc=2)
    req = run_child(
        "resample",
        args,
        ["--resamples", str(args.resamples), "--resample-targets", args.resample_targets],
    )
    one = q4["frozen"]["bytes_per_param"]
    two = [r["bytes_per_param"] for r in shard["ranks"]]
    n = q4["frozen"]["params"]
    print(f"frozen weights of the adapted layers ({n / 1e6:.1f}M weights):")
    print(f"  bf16, 1 rank       {bf16['frozen']['bytes_per_param']:.4f} bytes/param")
    print(f"  4-bit, 1 rank      {one:.4f} bytes/param ({q4['frozen']['local'] * mib:.1f} MiB)")
    for i, r in enumerate(shard["ranks"]):
        print(
            f"  4-bit, 2 ranks Z3  rank {i}: {r['bytes_per_param']:.4f} bytes/param "
            f"(packed {r['local_packed'] * mib:.2f} MiB, scales {r['local_scales'] * mib:.2f} MiB)"
        )
    print("training step, 1 process, batch 2 x <=128 tokens, bf16 compute (peak):")
    for name, r in (("bf16", bf16), ("4-bit", q4)):
        print(
            f"  {name:6s} tensors {r['tensor_peak'] * mib:8.1f} MiB (before the step "
            f"{r['tensor_before'] * mib:.1f})   RSS high-water {r['rss_peak'] * mib:8.1f} MiB"
        )
    ratio = q4["tensor_peak"] / bf16["tensor_peak"]
    rss_ratio = q4["rss_peak"] / bf16["rss_peak"] if bf16["rss_peak"] else float("nan")
    print(
        f"re-quantization error per resample ({req['matrices']} matrices, {args.resample_targets}):"
    )
    cum = 0.0
    for i, e in enumerate(req["errors"], 1):
        cum += e["abs_sum"]
        print(
            f"  {i:2d}: rel_total {e['rel_total']:.4f}  worst matrix {e['rel_max']:.4f}  "
            f"sum of ||E||_F {e['abs_sum']:.2f} (cumulative {cum:.2f})"
        )
    rel = [e["rel_total"] for e in req["errors"]]
    print(
        f"bytes_per_param_1rank={one:.4f} bytes_per_param_2ranks={max(two):.4f} "
        f"rss_ratio={rss_ratio:.3f} requant_rel_first={rel[0]:.4f} requant_rel_last={rel[-1]:.4f} "
        f"ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
