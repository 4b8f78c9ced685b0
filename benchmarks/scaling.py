"""How rosa-ds's own cost grows with the model: the CPU model-size ladder (random Llamas from
about 1M to about 400M parameters, ``builtin:ladder-*``) x LoRA, RoSA and ROSA, run through
``rosa-ds sweep`` and collected by ``rosa-ds sweep report``.

Per cell: the median step time, the mask-collection time (RoSA: the collection step and the
selection), the resample time (ROSA: merge, SVD and re-split of every adapted matrix), the peak
memory against the planner's, and the achieved TFLOP/s. Fitted over the ladder: the log-log
slope of each cost against the parameter count. The planner's step time is calibrated by one
figure (the median achieved TFLOP/s of the two largest rungs) and its error reported per rung.

Memory on a CPU is the process's RSS growth during the run, which also counts the allocator's
cached pages and library buffers: at the small rungs those fixed costs are most of the peak, so
the planner's error is reported over the rungs whose planned peak is at least ``--memory-floor``
MiB (every rung's figure is in the table), as measured (``planner_max_rel_err``) and net of the
process's fixed growth, the smallest rung's (``planner_max_rel_err_net``). The step-time slope
is fitted over every rung and over the rungs of 50M parameters and more (``_upper``), where
compute rather than per-step overhead makes the step. ROSA stops at ``--resample-up-to`` (one resample of
the 400M rung's 105 matrices takes minutes of SVD on 2 cores).

    python benchmarks/scaling.py                       # about 10 minutes on 2 cores
    python benchmarks/scaling.py --sizes 1m 4m 16m     # a quick look

Re-running continues the same sweep folder: finished cells are skipped, so a changed analysis
costs seconds. Last line: ``planner_max_rel_err=... planner_max_rel_err_net=...
time_max_rel_err=... step_time_exponent=... (LoRA; _rosa, _upper ...) resample_exponent=...
mask_exponent=... largest_trained=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rosa_ds.ladder import LADDER  # noqa: E402
from rosa_ds.sweep.cells import figure  # noqa: E402
from rosa_ds.sweep.report import loglog_slope, report  # noqa: E402

METHODS = {
    "lora": {"adapter.rank": 8},
    "rosa": {
        "adapter.rank": 8,
        "adapter.density": 0.005,
        "adapter.robust.mask_warmup_steps": 2,
        "adapter.robust.mask_grad_steps": 1,
    },
    "rosa-resample": {
        "adapter.rank": 8,
        "adapter.resample_every": 3,
        "adapter.subspace.at_start": False,
    },
}
FIXED = {
    "train.max_steps": 6,
    "train.micro_batch_size": 1,
    "train.global_batch_size": 2,
    "train.log_every": 1,
    "train.warmup_steps": 0,
    "train.save_every": 1000,
    "train.precision": "fp32",
    "data.max_length": 128,
    "data.packing": True,
    "data.num_train": 96,
    "eval.num_generate": 0,
    "eval.max_loss_examples": 4,
}


def grid(sizes: list[str], resample_up_to: str) -> dict:
    order = list(LADDER)
    too_big = [s for s in sizes if order.index(s) > order.index(resample_up_to)]
    spec = {
        "base": "tiny-lora",
        "fixed": FIXED,
        "axes": {
            "model": {s: {"model.name_or_path": f"builtin:ladder-{s}"} for s in sizes},
            "method": METHODS,
        },
    }
    if too_big:
        spec["exclude"] = [{"model": too_big, "method": "rosa-resample"}]
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(LADDER), choices=list(LADDER))
    ap.add_argument("--resample-up-to", default="160m", choices=list(LADDER))
    ap.add_argument("--out", default=str(REPO / "runs" / "scaling"))
    ap.add_argument("--memory-floor", type=float, default=256.0, help="MiB; see the docstring")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_file = out / "ladder.yaml"
    grid_file.write_text(yaml.safe_dump(grid(args.sizes, args.resample_up_to), sort_keys=False))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    cmd = [sys.executable, "-m", "rosa_ds.cli", "sweep", "--grid", str(grid_file),
           "--out", str(out / "sweep"), "--device", "cpu"]  # fmt: skip
    code = subprocess.run(cmd, env=env, cwd=REPO).returncode
    if code != 0:
        sys.exit(f"the sweep failed (exit {code}); see {out / 'sweep' / 'logs'}")
    result = report(out / "sweep")
    need = ("model_params", "step_seconds")
    rows = [r for r in result["rows"] if r["status"] == "finished" and all(r.get(k) for k in need)]
    if not rows:
        sys.exit(f"no cell reported a step time; see {out / 'sweep' / 'logs'}")
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    flops = {c["name"]: c["plan"].get("flops_step") for c in sweep["cells"]}
    rows = [r for r in rows if flops.get(r["name"])]  # cells the planner modelled

    # the planner's step time, calibrated by one achieved TFLOP/s from the largest rungs
    largest = sorted({r["model_params"] for r in rows})[-2:]
    calib = statistics.median(
        flops[r["name"]] / r["step_seconds"] / 1e12 for r in rows if r["model_params"] in largest
    )
    print(f"\n{'cell':<36} {'params':>8} {'step s':>8} {'planned':>8} {'TFLOP/s':>8} "
          f"{'mem GiB':>8} {'planned':>8} {'mask s':>7} {'resample s':>10}")  # fmt: skip
    # what the process adds whatever the model (engine, allocator pools, libraries): the
    # smallest rung's RSS growth, whose own tensors are a few MiB
    fixed_gib = min((r["peak_measured_gib"] for r in rows if r.get("peak_measured_gib")), default=0)
    time_err, mem_err, mem_err_net = [], [], []
    for r in sorted(rows, key=lambda r: (r["method"], r["model_params"])):
        planned_t = flops[r["name"]] / (calib * 1e12)
        achieved = flops[r["name"]] / r["step_seconds"] / 1e12
        big = (r["peak_planned_gib"] or 0) * 1024 >= args.memory_floor
        if r["model_params"] >= 1e7:
            time_err.append(abs(r["step_seconds"] / planned_t - 1))
        if big and r.get("measured_over_planned"):
            mem_err.append(abs(r["measured_over_planned"] - 1))
            net = (r["peak_measured_gib"] - fixed_gib) / r["peak_planned_gib"]
            mem_err_net.append(abs(net - 1))

        print(
            f"{r['name']:<36} {r['model_params'] / 1e6:>7.1f}M {r['step_seconds']:>8.3f} "
            f"{planned_t:>8.3f} {achieved:>8.3f} {figure(r['peak_measured_gib'], '8.3f')} "
            f"{figure(r['peak_planned_gib'], '8.3f')} {figure(r['mask_seconds'], '7.2f')} "
            f"{figure(r['resample_seconds'], '10.2f')}"
        )
    ex = result["exponents"]
    steps = ex.get("step_seconds", {})
    upper = {  # over the rungs where compute, not per-step overhead, makes the step
        m: loglog_slope(
            [
                (r["model_params"], r["step_seconds"])
                for r in rows
                if r["method"] == m and r["model_params"] >= 5e7
            ]
        )  # fmt: skip
        for m in ("lora", "robust", "subspace")
    }
    figures = {
        "planner_max_rel_err": max(mem_err, default=float("nan")),
        "planner_max_rel_err_net": max(mem_err_net, default=float("nan")),
        "process_fixed_gib": fixed_gib,
        "time_max_rel_err": max(time_err, default=float("nan")),
        "calibrated_tflops": calib,
        "step_time_exponent": steps.get("lora@1", float("nan")),
        "step_time_exponent_rosa": steps.get("robust@1", float("nan")),
        "step_time_exponent_rosa_resample": steps.get("subspace@1", float("nan")),
        "step_time_exponent_upper": upper["lora"] or float("nan"),
        "step_time_exponent_upper_rosa": upper["robust"] or float("nan"),
        "resample_exponent": ex.get("resample_seconds", {}).get("subspace@1", float("nan")),
        "mask_exponent": ex.get("mask_seconds", {}).get("robust@1", float("nan")),
    }
    biggest = max(rows, key=lambda r: r["model_params"])
    print(f"\nreport: {out / 'sweep' / 'report'} (results.csv, plots)")
    print(
        " ".join(f"{k}={v:.3f}" for k, v in figures.items())
        + f" largest_trained={biggest['model']} largest_params={biggest['model_params']}"
        + f" seconds={time.time() - t0:.0f}"
    )


if __name__ == "__main__":
    main()
