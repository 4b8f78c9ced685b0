"""LoRA, SpA, RoSA, ROSA, RoSA+ROSA and full fine-tuning at equal trainable-parameter budgets,
over seeds, with the learning rate chosen on a validation split and accuracy reported on a test
split, plus the controls that isolate RoSA's cause (random masks; LoRA alone at RoSA's rank).

Every cell is a real ``rosa-ds train`` run of SmolLM2-135M-Instruct on the generated
``multistep`` task (``--difficulty`` operations per problem), one process per run, ``--jobs``
runs at a time. The plan:

1. Sweep: each cell at each learning rate of its grid, seed 0, scored by exact match on the
   ``validation`` split (``--val`` problems; ties: the lower held-out loss). Grids: ``--lrs``
   for LoRA, SpA, RoSA and the hybrid, ``--subspace-lrs`` for ROSA (lower: its factors start
   carrying part of W), ``--full-lrs`` for full fine-tuning.
2. Seeds: each cell at its chosen learning rate, ``--seeds`` seeds (seed 0 reused).
3. Test: every seed's adapter scored with ``rosa-ds eval`` on the ``test`` split (``--test``
   problems), which no choice has seen.

Budgets: ``--small-rank`` and ``--large-rank`` give LoRA's trainable parameters; SpA spends
them on the sparse part alone, RoSA and the hybrid on rank/2 plus the density that makes up
the rest, ROSA on the rank itself; full fine-tuning trains every targeted weight. The official
settings (``IST-DASLab/RoSA``) are the starting point: AdamW (0.9, 0.999), no weight decay,
linear decay, alpha 16 at every rank, dropout 0.05, sparse values at ``--sparse-lr-ratio`` of
the low-rank learning rate (2e-4 / 7e-4), masks from per-sample squared gradients after a
LoRA warm-up, no gradient clipping.

Writes ``results.json``, a markdown table (mean +- std over seeds) and PNGs (accuracy by method
and budget with error bars, loss curves); the last line gives the key figures at the small
budget: ``rosa_minus_lora=``, ``subspace_minus_lora=``, ``full_minus_lora=`` (test exact match,
mean over seeds), then the same at the large budget with ``_large`` when it ran.

    python benchmarks/quality.py --plan             # the runs and their estimated cost
    python benchmarks/quality.py                    # the study (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rosa_ds.config import SPARSE_LR_RATIO  # noqa: E402  (the run's own default ratio)

MODEL = "builtin:smollm2-135m-instruct"
ALPHA = 16.0  # the official runs' alpha at every rank


@dataclass
class Cell:
    """One method at one budget: its overrides and its learning-rate grid."""

    name: str
    method: str
    budget: str
    overrides: list[str]
    lrs: list[float]
    control: bool = False
    mask_file: bool = False  # random masks, written before the run
    density: float = 0.0
    runs: dict = field(default_factory=dict)


def linear_shapes() -> list[tuple[int, int]]:
    """Shapes of the matrices the default targets adapt, read from a weightless model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.config import AdapterConfig, ModelConfig
    from rosa_ds.model import resolve_model_path

    path = resolve_model_path(ModelConfig(name_or_path=MODEL))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        inject_adapters(model, AdapterConfig(rank=1))
    return [(m.out_features, m.in_features) for m in adapted_modules(model).values()]


def lora_params(shapes, rank: int) -> int:
    return sum(rank * (o + i) for o, i in shapes)


def resample_every(args) -> int:
    """ROSA's interval for ``--resamples`` evenly spaced resamples in ``--steps`` steps."""
    return max(1, -(-args.steps // (args.resamples + 1)))


def check_resamples(args) -> None:
    """Refuse a ``--resamples`` that the interval cannot give (the trainer resamples at the
    multiples of it below ``--steps``): one line, exit 2."""
    every = resample_every(args)
    if (args.steps - 1) // every != args.resamples:
        print(
            f"quality.py: --resamples {args.resamples} does not fit {args.steps} steps evenly "
            f"(every {every} steps gives {(args.steps - 1) // every}); give fewer resamples or "
            "more --steps",
            file=sys.stderr,
        )
        sys.exit(2)


def cells(shapes, args) -> list[Cell]:
    numel = sum(o * i for o, i in shapes)
    lr = args.lrs
    every = resample_every(args)
    out = []
    for budget, rank in (("small", args.small_rank), ("large", args.large_rank)):
        if budget == "large" and args.small_only:
            continue
        half = rank // 2
        spa = lora_params(shapes, rank) / numel
        rosa = (lora_params(shapes, rank) - lora_params(shapes, half)) / numel
        warm = [f"adapter.robust.warmup_rank={half}"]
        out += [
            Cell(f"lora-r{rank}", "lora", budget, [f"adapter.rank={rank}"], lr),
            Cell(
                f"spa-{budget}",
                "sparse",
                budget,
                ["adapter.rank=0", f"adapter.density={spa:.6f}", *warm],
                lr,
                density=spa,
            ),
            Cell(
                f"rosa-r{half}-{budget}",
                "robust",
                budget,
                [f"adapter.rank={half}", f"adapter.density={rosa:.6f}"],
                lr,
                density=rosa,
            ),
            Cell(
                f"subspace-r{rank}",
                "subspace",
                budget,
                [f"adapter.rank={rank}", f"adapter.resample_every={every}"],
                args.subspace_lrs,
            ),
            Cell(
                f"hybrid-r{half}-{budget}",
                "hybrid",
                budget,
                [
                    f"adapter.rank={half}",
                    f"adapter.density={rosa:.6f}",
                    f"adapter.resample_every={every}",
                ],
                lr,
                density=rosa,
            ),
        ]
        if budget == "small":  # the controls isolate what RoSA's masks and sparse part add
            out += [
                Cell(
                    f"rosa-r{half}-random-mask",
                    "robust",
                    budget,
                    [f"adapter.rank={half}", f"adapter.density={rosa:.6f}"],
                    lr,
                    control=True,
                    mask_file=True,
                    density=rosa,
                ),
                Cell(f"lora-r{half}", "lora", budget, [f"adapter.rank={half}"], lr, control=True),
            ]
    out.append(Cell("full", "full", "full", ["adapter.method=full"], args.full_lrs))
    return out


def common(args) -> list[str]:
    return [
        f"model.name_or_path={MODEL}",
        "data.dataset=multistep",
        f"data.difficulty={args.difficulty}",
        f"data.num_train={args.num_train}",
        f"data.max_length={args.max_length}",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        "train.scheduler=linear",
        "train.weight_decay=0.0",
        "train.grad_clip=0",
        f"train.precision={args.precision}",
        f"adapter.alpha={ALPHA}",
        "adapter.dropout=0.05",
        f"adapter.robust.mask_warmup_steps={args.mask_warmup}",
        "adapter.robust.mask_grad_steps=1",
        "adapter.robust.grad_stat=per_sample_squared",
        "adapter.robust.after_mask=restart",
        f"eval.max_new_tokens={args.max_new_tokens}",
        "eval.batch_size=32",
        "eval.max_loss_examples=64",
        "deepspeed.config=zero2",
    ]


def env() -> dict[str, str]:
    import torch

    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    if not torch.cuda.is_available():
        e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rosa_ds.cli", *argv]


def run_logged(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def random_mask_file(cell: Cell, path: Path, seed: int) -> None:
    """Uniformly random masks with the per-matrix counts of RoSA's uniform budget."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.adapters.masks import save_masks
    from rosa_ds.config import AdapterConfig, ModelConfig
    from rosa_ds.kernels.csr import SparseStructure
    from rosa_ds.model import resolve_model_path

    model_path = resolve_model_path(ModelConfig(name_or_path=MODEL))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        inject_adapters(model, AdapterConfig(rank=1))
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in sorted(adapted_modules(model).items()):
        numel = m.out_features * m.in_features
        flat = torch.randperm(numel, generator=g)[: round(cell.density * numel)]
        masks[name] = SparseStructure.from_flat_indices(flat, (m.out_features, m.in_features))
    save_masks(path, masks)


def train_cell(cell: Cell, lr: float, seed: int, args, root: Path) -> dict:
    """Train one run (or reuse a finished one) and score it on the validation split."""
    out = root / cell.name / f"lr{lr:g}-seed{seed}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"train.lr={lr}", f"seed={seed}", f"data.seed={1234 + seed}"]
    if cell.method in ("robust", "sparse", "hybrid"):
        extra.append(f"adapter.robust.sparse_lr={lr * args.sparse_lr_ratio}")
    if cell.mask_file:
        mask = root / cell.name / f"masks-seed{seed}.safetensors"
        if not mask.is_file():
            random_mask_file(cell, mask, seed)
        extra.append(f"adapter.robust.mask_file={mask}")
    val = [
        "data.eval_split=validation",
        f"data.num_eval={args.val}",
        f"eval.num_generate={args.val}",
        "eval.before_training=false",
    ]
    if out.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(out)
    cmd = cli("train", *common(args), *cell.overrides, *extra, *val, f"output_dir={out}", *args.set)
    run_logged(cmd, out.parent / f"{out.name}.log")
    return json.loads((out / "summary.json").read_text())


def test_score(cell: Cell, lr: float, seed: int, args, root: Path) -> dict:
    out = root / cell.name / f"lr{lr:g}-seed{seed}"
    result = out / "test.json"
    if result.is_file():
        return json.loads(result.read_text())
    test = ["data.eval_split=test", f"data.num_eval={args.test}", f"eval.num_generate={args.test}"]
    cmd = cli(
        "eval",
        *common(args),
        *cell.overrides,
        f"seed={seed}",
        f"data.seed={1234 + seed}",
        *test,
        f"output_dir={out / 'test-eval'}",
        *args.set,  # an ablation's overrides, last so they win over the cell's own
        "--adapter",
        str(out / "adapter"),
    )
    log = out / "test.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env(), cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"test eval failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    scores = json.loads(proc.stdout[proc.stdout.index("{") :])
    result.write_text(json.dumps(scores, indent=1))
    return scores


def choose_lr(cell: Cell, sweep: dict[float, dict]) -> float:
    """The validation split's best exact match; ties: the lower held-out loss."""

    def key(lr: float):
        after = sweep[lr]["after"]
        return (-after["number_match"], after["eval_loss"])

    return min(sweep, key=key)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def plot(report: dict, curves: dict, root: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(report)
    means = [report[n]["test_mean"] for n in names]
    stds = [report[n]["test_std"] for n in names]
    colors = ["tab:gray" if report[n]["control"] else "tab:blue" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("test exact match (mean +- std over seeds)")
    ax.set_title("SmolLM2-135M, multistep arithmetic, equal trainable parameters")
    fig.tight_layout()
    fig.savefig(root / "accuracy.png", dpi=120)
    written.append(str(root / "accuracy.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("optimizer step (main pass)")
    ax.set_ylabel("training loss (seed 0, chosen lr)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=120)
    written.append(str(root / "loss_curves.png"))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="main-pass optimizer steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--mask-warmup", type=int, default=16, help="LoRA steps before collecting")
    ap.add_argument(
        "--resamples",
        type=int,
        default=2,
        help="N ROSA resamples in the main pass, every ceil(steps / (N + 1)) steps",
    )
    ap.add_argument("--difficulty", type=int, default=3)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--val", type=int, default=128, help="validation problems (lr choice)")
    ap.add_argument("--test", type=int, default=256, help="test problems (reported)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--small-rank", type=int, default=4)
    ap.add_argument("--large-rank", type=int, default=16)
    ap.add_argument("--small-only", action="store_true", help="skip the large budget")
    ap.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3])
    ap.add_argument("--full-lrs", type=float, nargs="+", default=[2e-5, 1e-4])
    ap.add_argument(
        "--subspace-lrs",
        type=float,
        nargs="+",
        default=[2.5e-4, 1e-3],
        help="the ROSA cells' grid: trainable factors that start carrying part of W want lower "
        "rates than LoRA's (2.5e-4 won at rank 16, 1e-3 beat 2e-3 at rank 4)",
    )
    ap.add_argument("--sparse-lr-ratio", type=float, default=SPARSE_LR_RATIO)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    ap.add_argument("--only", nargs="*", help="cell names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "runs" / "quality"))
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every run, over the cell's own (an ablation; its own --out)",
    )
    ap.add_argument("--plan", action="store_true", help="print the runs, run nothing")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    plan = [c for c in cells(linear_shapes(), args) if not args.only or c.name in args.only]
    if any(c.method in ("subspace", "hybrid") for c in plan):  # only ROSA cells resample
        check_resamples(args)
    n_sweep = sum(len(c.lrs) for c in plan)
    n_runs = n_sweep + len(plan) * (args.seeds - 1)
    print(
        f"{len(plan)} cells, {n_sweep} sweep runs + {len(plan) * (args.seeds - 1)} seed runs "
        f"= {n_runs} trainings, {len(plan) * args.seeds} test evaluations",
        flush=True,
    )
    if args.plan:
        for c in plan:
            print(f"  {c.name:26s} {c.method:9s} {c.budget:6s} lrs={c.lrs} {' '.join(c.overrides)}")
        return
    t0 = time.time()
    pool = ThreadPoolExecutor(args.jobs)
    futures = {
        (c.name, lr): pool.submit(train_cell, c, lr, 0, args, root) for c in plan for lr in c.lrs
    }
    sweeps = {c.name: {lr: futures[(c.name, lr)].result() for lr in c.lrs} for c in plan}
    chosen = {c.name: choose_lr(c, sweeps[c.name]) for c in plan}
    print(f"chosen learning rates (validation): {chosen}  ({time.time() - t0:.0f} s)", flush=True)
    jobs = [(c, s) for c in plan for s in range(1, args.seeds)]
    list(pool.map(lambda cs: train_cell(cs[0], chosen[cs[0].name], cs[1], args, root), jobs))
    tests = {
        (c.name, s): pool.submit(test_score, c, chosen[c.name], s, args, root)
        for c in plan
        for s in range(args.seeds)
    }
    report, curves = {}, {}
    for c in plan:
        lr = chosen[c.name]
        test = [tests[(c.name, s)].result()["number_match"] for s in range(args.seeds)]
        val = [train_cell(c, lr, s, args, root)["after"]["number_match"] for s in range(args.seeds)]
        first = train_cell(c, lr, 0, args, root)
        curves[c.name] = first["losses"]
        tm, ts = mean_std(test)
        vm, vs = mean_std(val)
        report[c.name] = {
            "method": c.method,
            "budget": c.budget,
            "control": c.control,
            "lr": lr,
            "sweep_val": {f"{k:g}": v["after"]["number_match"] for k, v in sweeps[c.name].items()},
            "val_mean": vm,
            "val_std": vs,
            "test": test,
            "test_mean": tm,
            "test_std": ts,
            "trainable": first["trainable_elements"],
            "train_seconds": first["train_seconds"],
        }
    (root / "results.json").write_text(json.dumps({"args": vars(args), "cells": report}, indent=1))
    lines = [
        "| cell | method | budget | lr | val exact match | test exact match (mean +- std) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report.items():
        tag = " (control)" if r["control"] else ""
        lines.append(
            f"| {name}{tag} | {r['method']} | {r['budget']} | {r['lr']:g} | "
            f"{r['val_mean']:.3f} | {r['test_mean']:.3f} +- {r['test_std']:.3f} |"
        )
    table = "\n".join(lines)
    (root / "table.md").write_text(table + "\n")
    print(table)
    for png in plot(report, curves, root):
        print(f"plot: {png}")

    def mean_of(method: str, budget: str) -> float | None:
        found = [
            r["test_mean"]
            for r in report.values()
            if r["method"] == method and r["budget"] in (budget, "full") and not r["control"]
        ]
        return found[0] if found else None

    def differences(budget: str, suffix: str) -> list[str]:
        lora = mean_of("lora", budget)
        out = []
        for key, method in (("rosa", "robust"), ("subspace", "subspace"), ("full", "full")):
            v = mean_of(method, budget)
            diff = v - lora if v is not None and lora is not None else float("nan")
            out.append(f"{key}_minus_lora{suffix}={diff:.3f}")
        return [*out, f"lora_{budget}={lora if lora is not None else float('nan'):.3f}"]

    figures = differences("small", "")  # the key figures: the small budget's
    if any(r["budget"] == "large" for r in report.values()):
        figures += differences("large", "_large")
    print(" ".join([*figures, f"seconds={time.time() - t0:.0f}"]))


if __name__ == "__main__":
    main()
