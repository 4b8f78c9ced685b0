"""Run as every rank of a job: train a few steps, resample once, and record what the tests
check (logits around the resample, the new factors and frozen weights, Adam's state, the lr).

    torchrun --nproc_per_node 2 tests/probes/resample_probe.py OUT.pt key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_optimizer_state  # noqa: E402

from rosa_ds.adapters.inject import adapted_modules  # noqa: E402
from rosa_ds.config import load_config  # noqa: E402
from rosa_ds.data.batching import collate  # noqa: E402
from rosa_ds.engine import build_engine  # noqa: E402
from rosa_ds.methods import Progress, Run  # noqa: E402
from rosa_ds.methods.subspace import Subspace  # noqa: E402
from rosa_ds.preflight import prepare  # noqa: E402
from rosa_ds.tracking import MetricsLog, quiet_libraries  # noqa: E402
from rosa_ds.train import make_sampler, optimizer_step  # noqa: E402
from rosa_ds.zero_params import link_optimizer_states, read_full  # noqa: E402


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("tiny-subspace", overrides)
    prep = prepare(cfg, resume=None, training=False)
    quiet_libraries()
    masks = None
    if cfg.adapter.density > 0:  # the hybrid: random masks stand in for gradient-chosen ones
        from transformers import AutoModelForCausalLM

        from rosa_ds.adapters.inject import inject_adapters
        from rosa_ds.kernels.csr import SparseStructure

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(prep.hf_config)
            inject_adapters(skeleton, cfg.adapter)
        g = torch.Generator().manual_seed(0)
        masks = {}
        for name, m in sorted(adapted_modules(skeleton).items()):
            numel = m.out_features * m.in_features
            flat = torch.randperm(numel, generator=g)[: round(cfg.adapter.density * numel)]
            masks[name] = SparseStructure.from_flat_indices(flat, (m.out_features, m.in_features))
    method = Subspace(cfg, Path(out).parent)  # the re-warm-up's factor is the method's
    options = method.engine_options(Progress("train", 0))
    options.masks = masks
    built = build_engine(
        cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=True, options=options
    )
    engine, p = built.engine, built.placement
    sampler = make_sampler(cfg, prep, built)
    pad = prep.tokenizer.pad_token_id

    def step(i: int) -> None:
        optimizer_step(built, prep, sampler, i)

    for i in range(3):
        step(i)
    probe = collate(prep.eval_examples[:2], pad)

    def logits() -> torch.Tensor:
        engine.eval()
        with torch.no_grad():
            value = engine(**probe).logits.float().cpu()
        engine.train()
        return value

    modules = sorted(adapted_modules(built.model).items())
    link_optimizer_states(engine)
    sparse_before = {
        n: read_full(m.sparse_values, master=True, keep=True)
        for n, m in modules
        if m.sparse_values is not None
    }
    before = logits()
    lr_before = engine.get_lr()[0]
    moment_before = sum(
        float(safe_get_full_optimizer_state(m.lora_A, "exp_avg").abs().sum()) for _, m in modules
    )
    # the trainer's own resample: factors, frozen weights, Adam state, re-warm-up
    progress = Progress("train", 3)
    log = MetricsLog(Path(out).parent, enabled=False)
    method.resample(Run(built, progress, log, steps_per_epoch=1))
    report = progress.history["resample"]
    after = logits()
    moments = {}
    for name, m in modules:
        for attr in ("lora_A", "lora_B"):
            for key in ("exp_avg", "exp_avg_sq"):
                moments[f"{name}.{attr}.{key}"] = float(
                    safe_get_full_optimizer_state(getattr(m, attr), key).abs().sum()
                )
    weights = {}
    for name, m in modules:
        weights[f"{name}.w"] = m.frozen.read_full(keep=True)  # W0, not W0 + S held merged
        weights[f"{name}.a"] = read_full(m.lora_A, master=True, keep=True)
        weights[f"{name}.b"] = read_full(m.lora_B, master=True, keep=True)
        weights[f"{name}.a_model"] = read_full(m.lora_A, master=False, keep=True)
    lr_after = engine.get_lr()[0]
    sparse_after = {
        n: read_full(m.sparse_values, master=True, keep=True)
        for n, m in modules
        if m.sparse_values is not None
    }
    sparse_moments = sum(
        float(safe_get_full_optimizer_state(m.sparse_values, "exp_avg").abs().sum())
        for _, m in modules
        if m.sparse_values is not None
    )
    step(3)  # training goes on after the resample
    after_step = logits()
    if p.rank == 0:
        torch.save(
            {
                "before": before,
                "after": after,
                "after_step": after_step,
                "lr_before": lr_before,
                "lr_after": lr_after,
                "moments": moments,
                "moment_before": moment_before,
                "weights": weights,
                "indices": report["indices"],
                "owners": report["owners"],
                "world": p.world_size,
                "sparse_before": sparse_before,
                "sparse_after": sparse_after,
                "sparse_moments": sparse_moments,
            },
            out,
        )


if __name__ == "__main__":
    main()
