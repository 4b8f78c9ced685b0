"""LoRA vs SpA vs RoSA at the same trainable-parameter budget on the bundled arithmetic task.

Each method is a real ``rosa-ds train`` run (``--nproc`` ranks, ZeRO-2) of SmolLM2-135M-Instruct
from the ``smollm2-lora`` config: same data, seed, learning rate and number of main-pass steps.
The budget is LoRA's at ``--rank``; RoSA gets rank/2 plus the density that makes up the
difference, SpA (rank 0) the density that matches it alone. RoSA and SpA first run their
mask warm-up pass (``--mask-warmup`` steps, then one step of gradient collection) and restart,
as the reference does. Prints a table of held-out loss and exact-match accuracy (plus the base
model's), writes ``results.json`` and a PNG of the loss curves, and ends with the key figures.

    python benchmarks/quality_robust.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def linear_shapes(model_name: str) -> list[tuple[int, int]]:
    """Shapes of the matrices the default targets adapt, read from a weightless model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.config import AdapterConfig, ModelConfig
    from rosa_ds.model import resolve_model_path

    path = resolve_model_path(ModelConfig(name_or_path=model_name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        inject_adapters(model, AdapterConfig(rank=1))
    return [(m.out_features, m.in_features) for m in adapted_modules(model).values()]


def budgets(shapes: list[tuple[int, int]], rank: int) -> dict[str, list[str]]:
    numel = sum(o * i for o, i in shapes)
    lora_params = sum(rank * (o + i) for o, i in shapes)
    half = rank // 2
    rosa_density = (lora_params - sum(half * (o + i) for o, i in shapes)) / numel
    spa_density = lora_params / numel
    return {
        "lora": [f"adapter.rank={rank}"],
        "sparse": [
            "adapter.rank=0",
            f"adapter.density={spa_density:.6f}",
            f"adapter.robust.warmup_rank={half}",
        ],
        "robust": [f"adapter.rank={half}", f"adapter.density={rosa_density:.6f}"],
    }


def run(name: str, overrides: list[str], args, out_root: Path) -> dict:
    out = out_root / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc_per_node={args.nproc}",
        f"--master_port={29700 + hash(name) % 200}",
        str(REPO / "launcher" / "main.py"),
        "train",
        "--config",
        "smollm2-lora",
        f"output_dir={out}",
        f"train.max_steps={args.steps}",
        f"adapter.robust.mask_warmup_steps={args.mask_warmup}",
        f"eval.num_generate={args.num_generate}",
        *overrides,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["trainable"] = trainable_count(out / "adapter")
    return summary


def trainable_count(adapter_dir: Path) -> int:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter.safetensors"))
    trainable = ("lora_A", "lora_B", "sparse_values")
    return sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[1] in trainable)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in results.items():
        ax.plot(range(1, len(s["losses"]) + 1), s["losses"], label=name)
    ax.set_xlabel("optimizer step (main pass)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, arithmetic, equal trainable parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mask-warmup", type=int, default=8)
    ap.add_argument("--num-generate", type=int, default=48)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "quality_robust"))
    args = ap.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    plans = budgets(linear_shapes("builtin:smollm2-135m-instruct"), args.rank)
    results = {name: run(name, overrides, args, out_root) for name, overrides in plans.items()}
    base = results["lora"]["before"]
    rows = [("base model", "-", base["eval_loss"], base["number_match"], "-")]
    for name, s in results.items():
        secs = s["train_seconds"]
        rows.append(
            (
                name,
                s["trainable"],
                s["after"]["eval_loss"],
                s["after"]["number_match"],
                f"{secs:.0f}",
            )
        )
    print("\n| method | trainable | held-out loss | exact match | train s |")
    print("|---|---|---|---|---|")
    for name, n, loss, acc, secs in rows:
        print(f"| {name} | {n} | {loss:.4f} | {acc:.3f} | {secs} |")
    (out_root / "results.json").write_text(
        json.dumps({"plans": plans, "results": results}, indent=2)
    )
    png = out_root / "loss_curves.png"
    print(f"loss curves: {png}" if plot(results, png) else "matplotlib missing: no PNG")
    print(
        " ".join(
            [f"base_acc={base['number_match']:.3f}"]
            + [f"{n}_acc={s['after']['number_match']:.3f}" for n, s in results.items()]
            + [f"{n}_loss={s['after']['eval_loss']:.4f}" for n, s in results.items()]
        )
    )


if __name__ == "__main__":
    main()
