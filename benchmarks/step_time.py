"""Median training-step times, two contenders measured in one run, stepped alternately
(A, B, A, B, ...) so that machine noise hits both alike. The last line prints ``ratio=X``.

    python benchmarks/step_time.py --vs peft   # rosa-ds LoRA / HF PEFT LoRA, one process
    python benchmarks/step_time.py --vs lora   # RoSA / LoRA at equal trainable parameters,
                                               # 2 ranks, ZeRO-2 (re-launches under torchrun)

``--vs lora``: LoRA at rank ``--rank`` against RoSA at rank ``--rank / 2`` plus the density
that makes the trainable-parameter counts equal on this model's shapes (the paper's
LoRA r=32 against RoSA r=16 + 0.6% on 7B shapes, transposed to the benchmark model). The masks
are chosen as training chooses them, from the frozen weights' squared gradients on generated
problems (they concentrate in rows and columns, which changes the sparse kernels' speed);
``--masks random`` draws them uniformly instead. Rank 0 then times the parts of RoSA's step
that LoRA does not have, on the CPU (the SDDMM of the values' gradient, compiled and through
torch's ``sampled_addmm``, and the in-place merges of ``S`` into ``W``)
on the same shapes, so the last lines say where the extra time goes; on the CPU the same kernels
are also timed inside the measured RoSA steps (``sddmm_in_step_ms``, ``merges_in_step_ms``: slower
than alone, their operands no longer in cache), and each step's CPU time on rank 0
(``cpu_ratio``: the ratio without waits for the other rank). ``paired_ratio`` is the median of
the per-iteration ratios (both engines step back to back in each iteration, so a slow drift of
the machine cancels); ``ratio`` is the ratio of the medians. ``--control`` times LoRA against a
second, identical LoRA engine (an A/A run): how far its ratio lands from 1 is what one run can
resolve on this machine.
"""

from __future__ import annotations

import argparse
import os
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
    # as a run loads it (hub kernels off): both sides of the comparison the same
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, **ModelConfig(name_or_path=path).pretrained_kwargs()
    )
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


def equal_budget_density(shapes: list[tuple[int, int]], lora_rank: int, rosa_rank: int) -> float:
    """The density at which RoSA (rank ``rosa_rank``) trains as many parameters as LoRA."""
    extra = sum((lora_rank - rosa_rank) * (o + i) for o, i in shapes)
    return extra / sum(o * i for o, i in shapes)


def random_masks(model, density: float, seed: int):
    from rosa_ds.adapters.inject import adapted_modules
    from rosa_ds.kernels.csr import SparseStructure

    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in sorted(adapted_modules(model).items()):
        numel = m.out_features * m.in_features
        k = round(density * numel)
        flat = torch.randperm(numel, generator=g)[:k]
        masks[name] = SparseStructure.from_flat_indices(flat, (m.out_features, m.in_features))
    return masks


def problem_batch(tok, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` generated multi-step problems, padded or cut to ``seq`` tokens."""
    from rosa_ds.data.tasks import generate

    texts = [f"{r['question']}\n{r['answer']}" for r in generate("multistep", batch, seed, 3)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {"input_ids": enc.input_ids, "labels": enc.input_ids.clone()}


def gradient_masks(path: str, cfg, tok, args) -> dict:
    """Masks as a run chooses them: the collector's squared frozen-weight gradients over two
    micro-batches per rank (reduce-scattered across the ranks), top-k per matrix."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rosa_ds.adapters.inject import inject_adapters
    from rosa_ds.adapters.masks import GradientCollector

    torch.manual_seed(0)
    device = _device()
    kwargs = cfg.model.pretrained_kwargs()  # as a run loads it (hub kernels off)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).to(device)
    inject_adapters(model, cfg.adapter)
    collector = GradientCollector(model, cfg.adapter)  # reduces on the weights' device
    collector.start()
    for i in range(2):
        batch = problem_batch(tok, args.batch, args.seq, 100 + 2 * dist.get_rank() + i)
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        collector.count_micro_batch()
    collector.stop()
    return {name: s.to("cpu") for name, s in collector.select(cfg.adapter).items()}


def _device() -> torch.device:
    """This rank's accelerator (its GPU, or the CPU), as DeepSpeed places the engines."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def concentration(masks: dict) -> tuple[float, float]:
    """The share of non-zeros in the densest 10% of rows and of columns (mean over matrices);
    a column's count is its row's in the cached transpose."""

    def top_share(row_ptr: torch.Tensor, nnz: int) -> float:
        counts = torch.diff(row_ptr.long())
        top = counts.sort(descending=True).values[: max(1, counts.numel() // 10)]
        return float(top.sum()) / max(nnz, 1)

    rows = [top_share(s.row_ptr, s.nnz) for s in masks.values()]
    cols = [top_share(s.t_row_ptr, s.nnz) for s in masks.values()]
    return statistics.mean(rows), statistics.mean(cols)


def sparse_parts_ms(masks: dict, tokens: int, repeats: int = 5) -> dict[str, float]:
    """Per step, summed over the adapted matrices: the SDDMM and the merge RoSA adds (``S``
    written into ``W`` again from the saved ``W0`` once ``S`` has changed: once per optimizer
    step, the merge being held between GEMMs), for comparison the SDDMM through torch's
    ``sampled_addmm`` (the path without the compiled kernel), and for scale the two frozen GEMMs
    (forward, input gradient) both methods run."""
    from rosa_ds.kernels import torch_sparse
    from rosa_ds.kernels.sparse_linear import write_merged

    def median_ms(fn, *args) -> float:
        fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    total = {"sddmm": 0.0, "sampled_addmm": 0.0, "merges": 0.0, "frozen_gemms": 0.0}
    for s in masks.values():
        out_f, in_f = s.shape
        dy, x = torch.randn(tokens, out_f), torch.randn(tokens, in_f)
        w, values = torch.randn(out_f, in_f), torch.randn(s.nnz)
        positions = s.flat_indices()
        saved = w.view(-1)[positions].clone()
        total["sddmm"] += median_ms(torch_sparse.sddmm, dy, x, s)
        total["sampled_addmm"] += median_ms(torch_sparse.sampled_sddmm, dy, x, s)
        total["merges"] += median_ms(write_merged, w.view(-1), saved, values, positions)
        total["frozen_gemms"] += 2 * median_ms(torch.mm, x, w.T)
    return total


class KernelClock:
    """Milliseconds spent inside the compiled CPU kernels (the SDDMM, the merges and restores)
    while ``active``: the module ``cpu_native.kernels()`` returns is wrapped for this process,
    so the figures are taken inside real steps, with their operands as cold as a step leaves
    them (timing the kernels alone on the same shapes finds them in cache)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.active = False

    def install(self) -> bool:
        from rosa_ds.kernels import cpu_native

        native = cpu_native.kernels()
        if native is None:
            return False
        clock = self

        class Timed:
            def __getattr__(self, name: str):
                fn = getattr(native, name)

                def timed(*args, **kwargs):
                    if not clock.active:
                        return fn(*args, **kwargs)
                    t0 = time.perf_counter()
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        elapsed = (time.perf_counter() - t0) * 1000
                        clock.ms[name] = clock.ms.get(name, 0.0) + elapsed

                return timed

        timed_module = Timed()
        cpu_native.kernels = lambda: timed_module  # the callers look it up at each call
        return True


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` and ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def vs_lora(args) -> None:
    """RoSA against LoRA at the same trainable-parameter budget, 2 ranks, ZeRO-2."""
    if "RANK" not in os.environ:  # re-launch this script as args.nproc ranks
        torchrun = Path(sys.executable).parent / "torchrun"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        # the ranks learn their number from torchrun: some torchrun versions take a script's
        # --nproc for an abbreviation of their own --nproc-per-node and stop
        own = _without_option(sys.argv[1:], "--nproc")
        cmd = [str(torchrun), f"--nproc_per_node={args.nproc}", __file__, *own]
        os.execve(str(torchrun), cmd, env)
    args.nproc = int(os.environ.get("WORLD_SIZE", args.nproc))
    import torch.distributed as dist

    from rosa_ds.adapters.inject import adapted_modules
    from rosa_ds.config import load_config
    from rosa_ds.engine import EngineOptions, build_engine
    from rosa_ds.model import load_tokenizer
    from rosa_ds.tracking import quiet_libraries

    quiet_libraries()
    base = [
        f"model.name_or_path={args.model}",
        f"train.precision={args.dtype}",
        "deepspeed.config=zero2",
        f"train.micro_batch_size={args.batch}",
        f"train.global_batch_size={args.batch * args.nproc}",
        "train.max_steps=1000",
        "adapter.dropout=0.0",
        "train.warmup_steps=0",
        "train.scheduler=constant",
    ]
    lora_cfg = load_config("smollm2-lora", [*base, f"adapter.rank={args.rank}"])
    rosa_rank = args.rank // 2 if args.rosa_rank is None else args.rosa_rank
    path = resolve_model_path(lora_cfg.model)
    tok = load_tokenizer(path, lora_cfg.model)
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(path).hidden_size
    lora = build_engine(lora_cfg, path, tok, hidden, training=True)
    shapes = [(m.out_features, m.in_features) for m in adapted_modules(lora.model).values()]
    density = equal_budget_density(shapes, args.rank, rosa_rank)
    rosa_cfg = load_config(
        "smollm2-lora",
        [
            *base,
            f"adapter.rank={rosa_rank}",
            f"adapter.density={density}",
            "adapter.robust.mask_warmup_steps=0",
        ],
    )
    if args.masks == "random":
        masks = random_masks(lora.model, density, seed=0)
    else:
        masks = gradient_masks(path, rosa_cfg, tok, args)
    if args.control:  # A/A: the "rosa" side is a second engine of LoRA's own config
        rosa = build_engine(lora_cfg, path, tok, hidden, training=True)
    else:
        rosa = build_engine(
            rosa_cfg, path, tok, hidden, training=True, options=EngineOptions(masks=masks)
        )
    engines = {"rosa": rosa.engine, "lora": lora.engine}
    count = {
        k: sum(p.numel() for p in e.module.parameters() if p.requires_grad)
        for k, e in engines.items()
    }
    batch = problem_batch(tok, args.batch, args.seq, seed=dist.get_rank())
    batch = {k: v.to(_device()) for k, v in batch.items()}
    from deepspeed.accelerator import get_accelerator

    sync = get_accelerator().synchronize  # a GPU step ends when its kernels do
    on_cpu = _device().type == "cpu"
    clock = KernelClock()
    clocked = on_cpu and clock.install()
    times: dict[str, list[float]] = {k: [] for k in engines}
    cpu_times: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(args.warmup + args.steps):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for kind in order:
            engine = engines[kind]
            clock.active = kind == "rosa" and i >= args.warmup
            sync()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            c1 = time.thread_time()  # this rank's own work, without waits for the other
            sync()
            dist.barrier()
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
                cpu_times[kind].append(c1 - c0)
    clock.active = False
    if dist.get_rank() != 0:
        return
    med = {k: statistics.median(v) for k, v in times.items()}
    # each iteration steps both engines back to back: the median of the per-iteration ratios
    # cancels slow drifts of the machine's speed that the ratio of medians keeps
    paired = statistics.median(r / b for r, b in zip(times["rosa"], times["lora"], strict=True))
    print(
        f"model={args.model} ranks={args.nproc} zero=2 batch={args.batch}x{args.seq} "
        f"dtype={args.dtype} steps={args.steps} threads={torch.get_num_threads()}"
    )
    if args.control:
        print("A/A control: the 'rosa' engine below is a second LoRA engine, not RoSA")
    print(
        f"lora r={args.rank}: {count['lora']} trainable; rosa r={rosa_rank} + density "
        f"{density:.4%}: {count['rosa']} trainable (ratio {count['rosa'] / count['lora']:.4f})"
    )
    for kind, value in med.items():
        print(
            f"{kind:5s} median step {value * 1000:.1f} ms "
            f"(min {min(times[kind]) * 1000:.1f}, max {max(times[kind]) * 1000:.1f})"
        )
    rows, cols = concentration(masks)
    print(
        f"{args.masks} masks: the densest 10% of rows hold {rows:.0%} of the non-zeros, "
        f"of columns {cols:.0%} (mean over {len(masks)} matrices)"
    )
    parts = sparse_parts_ms(masks, args.batch * args.seq)
    from rosa_ds.kernels import cpu_native

    sddmm_kind = "compiled kernel" if cpu_native.available() else "sampled_addmm"
    extra = (med["rosa"] - med["lora"]) * 1000
    print(
        f"RoSA's extra {extra:.1f} ms per step; timed alone on rank 0, per step: SDDMM "
        f"{parts['sddmm']:.1f} ms ({sddmm_kind}; torch's sampled_addmm "
        f"{parts['sampled_addmm']:.1f} ms), merging the updated S into W {parts['merges']:.1f} ms "
        f"(the frozen GEMMs both methods run: {parts['frozen_gemms']:.1f} ms)"
    )
    in_step = ""
    if clocked:
        sddmm_in = clock.ms.get("sddmm", 0.0) / args.steps
        merges_in = (
            sum(clock.ms.get(k, 0.0) for k in ("merge_in_place", "write_merged", "restore"))
            / args.steps
        )
        cpu = {k: statistics.median(v) * 1000 for k, v in cpu_times.items()}
        print(
            f"inside the timed RoSA steps, per step: SDDMM {sddmm_in:.1f} ms, merges and "
            f"restores {merges_in:.1f} ms; this rank's CPU time per step (no waits for the other "
            f"rank): RoSA {cpu['rosa']:.1f} ms, LoRA {cpu['lora']:.1f} ms "
            f"(extra {cpu['rosa'] - cpu['lora']:.1f} ms; the rest of the wall-clock extra is "
            "time not running: waits for the other rank at the all-reduce, or descheduled)"
        )
        in_step = (
            f"sddmm_in_step_ms={sddmm_in:.1f} merges_in_step_ms={merges_in:.1f} "
            f"cpu_ratio={cpu['rosa'] / cpu['lora']:.3f} "
        )
    print(
        f"rosa_ms={med['rosa'] * 1000:.1f} lora_ms={med['lora'] * 1000:.1f} "
        f"density={density:.5f} sddmm_ms={parts['sddmm']:.1f} "
        f"sampled_addmm_ms={parts['sampled_addmm']:.1f} merges_ms={parts['merges']:.1f} "
        f"{in_step}paired_ratio={paired:.3f} ratio={med['rosa'] / med['lora']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs", choices=["peft", "lora"], default="peft")
    ap.add_argument("--nproc", type=int, default=2, help="ranks for --vs lora")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--rosa-rank",
        type=int,
        help="RoSA's rank for --vs lora (default rank/2); the density fills the rest of the "
        "budget, so a higher rank means a sparser part (7B-like densities near rank - 2)",
    )
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--masks", choices=["gradient", "random"], default="gradient", help="for --vs lora"
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="for --vs lora: time LoRA against a second, identical LoRA engine in RoSA's place "
        "(an A/A run: its ratio's distance from 1 is this machine's noise)",
    )
    args = ap.parse_args()
    if args.rosa_rank is not None and not 0 <= args.rosa_rank < args.rank:
        ap.error(f"--rosa-rank must be in [0, --rank={args.rank}), got {args.rosa_rank}")
    if args.control and args.vs != "lora":
        ap.error("--control is an A/A run of --vs lora; add --vs lora")
    if args.vs == "lora":
        vs_lora(args)
        return
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
