"""Median training-step time of rosa-ds LoRA against HF PEFT LoRA, measured in one run.

Same model, rank, alpha, targets, batch, sequence length and optimizer; the two are stepped
alternately (A, B, A, B, ...) so that machine noise hits both alike. Single process, CPU by
default. The last line prints ``ratio=X`` (rosa-ds / PEFT).

    python benchmarks/step_time.py --vs peft
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_ds.adapters.inject import inject_adapters  # noqa: E402
from rosa_ds.config import AdapterConfig, ModelConfig  # noqa: E402
from rosa_ds.model import resolve_model_path  # noqa: E402


def build(kind: str, path: str, rank: int, alpha: float, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if kind == "rosa-ds":
        inject_adapters(model, AdapterConfig(rank=rank, alpha=alpha, targets=["all-linear"]))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs", choices=["peft"], default="peft")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    models = {k: build(k, path, args.rank, args.alpha, dtype) for k in ("rosa-ds", "peft")}
    vocab = models["peft"][0].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for kind in order:
            t = step(*models[kind], batch)
            if i >= args.warmup:
                times[kind].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} rank={args.rank} batch={args.batch} seq={args.seq} "
        f"dtype={args.dtype} steps={args.steps} threads={torch.get_num_threads()}"
    )
    for kind, value in med.items():
        print(
            f"{kind:8s} median step {value * 1000:.1f} ms "
            f"(min {min(times[kind]) * 1000:.1f}, max {max(times[kind]) * 1000:.1f})"
        )
    ratio = med["rosa-ds"] / med["peft"]
    print(
        f"rosa_ds_ms={med['rosa-ds'] * 1000:.1f} peft_ms={med['peft'] * 1000:.1f} ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
