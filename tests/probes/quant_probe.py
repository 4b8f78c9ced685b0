"""Run as every rank of a job on a 4-bit model: measure what each rank holds of the quantized
records, check them against a single-process quantization, train a step, and (with a subspace
config) resample once and record the logits around it and the reported re-quantization error.

    torchrun --nproc_per_node 2 tests/probes/quant_probe.py OUT.json CONFIG key=value ...

Rank R writes OUT.json with ``.rank<R>`` before the suffix for R > 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rosa_ds.config import load_config  # noqa: E402
from rosa_ds.data.batching import collate  # noqa: E402
from rosa_ds.engine import build_engine, torch_dtype  # noqa: E402
from rosa_ds.methods import Progress, Run  # noqa: E402
from rosa_ds.methods.subspace import Subspace  # noqa: E402
from rosa_ds.preflight import prepare  # noqa: E402
from rosa_ds.quant import linear as qlinear  # noqa: E402
from rosa_ds.quant.files import quantized_layers  # noqa: E402
from rosa_ds.quant.load import frozen_bytes  # noqa: E402
from rosa_ds.quant.nf4 import quantize  # noqa: E402
from rosa_ds.tracking import (
    MetricsLog,  # noqa: E402
    quiet_libraries,  # noqa: E402
)
from rosa_ds.train import make_sampler  # noqa: E402
from rosa_ds.weight_files import read_tensor  # noqa: E402


def main() -> None:
    out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(config, ["quant.bits=4", *overrides])
    prep = prepare(cfg, resume=None, training=False)
    quiet_libraries()
    built = build_engine(cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=True)
    engine, p = built.engine, built.placement
    layers = quantized_layers(built.model)
    result: dict = {"rank": p.rank, "world": p.world_size, "zero_stage": built.zero_stage}

    # 1. what this rank holds, measured from the tensors
    result["bytes"] = frozen_bytes(built.model)
    whole = {"packed": 0, "scales": 0}
    for m in layers.values():
        for k, v in m.spec.component_bytes().items():
            whole[k] += v
    result["bytes"]["total_packed"] = whole["packed"]
    result["bytes"]["total_scales"] = whole["scales"]
    result["held_numel"] = {n: int(m.qweight.numel()) for n, m in layers.items()}

    # 2. every partition is its slice of the full records; the records are what one process
    # quantizing the base weight gets
    dtype = torch_dtype(cfg.train.precision)
    slices_ok, records_ok = True, True
    for name, m in sorted(layers.items()):
        full = m.read_stored(keep=True)
        if hasattr(m.qweight, "ds_tensor"):
            part = m.qweight.ds_tensor
            start = p.rank * part.ds_numel
            mine = full[start : start + part.numel()]
            slices_ok &= torch.equal(part.cpu()[: mine.numel()], mine)
        w0 = read_tensor(prep.model_path, f"{name}.weight").to(dtype)
        records_ok &= torch.equal(full, quantize(w0, m.spec))
    result["slices_match"], result["records_match_single_process"] = slices_ok, records_ok

    # 3. one training step: between forward and backward the records are partitioned again,
    # and backward is served by DeepSpeed's re-gather (the layer never gathers on its own)
    sampler = make_sampler(cfg, prep, built)
    qlinear.OWN_GATHERS[0] = 0
    held_between = []
    for indices in sampler.micro_batches(0):
        batch = collate([prep.train_examples[i] for i in indices], prep.tokenizer.pad_token_id)
        loss = engine(**batch).loss
        held_between.append(sum(int(m.qweight.numel()) for m in layers.values()))
        engine.backward(loss)
        engine.step()
    result["held_between_forward_and_backward"] = held_between
    result["own_gathers_in_training"] = qlinear.OWN_GATHERS[0]

    # 4. subspace configs: resample once through the trainer, logits around it
    if cfg.adapter.resampling:
        probe = collate(prep.eval_examples[:2], prep.tokenizer.pad_token_id)

        def logits() -> torch.Tensor:
            engine.eval()
            with torch.no_grad():
                value = engine(**probe).logits.float().cpu()
            engine.train()
            return value

        before = logits()
        progress = Progress("train", 1)
        log = MetricsLog(Path(out).parent, enabled=False)
        Subspace(cfg, Path(out).parent).resample(Run(built, progress, log, steps_per_epoch=1))
        after = logits()
        state = progress.history["resample"]
        result["requant"] = state.get("requant")
        result["logit_change_rel"] = float((after - before).norm() / before.norm())
        result["logit_change_max"] = float((after - before).abs().max())
        result["logit_max"] = float(before.abs().max())
    target = Path(out)
    if p.rank:
        target = target.with_name(f"{target.stem}.rank{p.rank}{target.suffix}")
    target.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
