"""The training loop: evaluate, train ``max_steps`` optimizer steps, checkpoint, evaluate again.

Each optimizer step consumes one global batch from the step-indexed sampler (so resuming from
step N continues with batch N); each micro-batch is a DeepSpeed ``backward`` + ``step`` (DeepSpeed
steps the optimizer and the schedule at the accumulation boundary).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rosa_ds.adapters.io import adapter_meta, gather_adapter_state, save_adapter
from rosa_ds.checkpoint import load_checkpoint, save_checkpoint
from rosa_ds.config import RunConfig, dump_config
from rosa_ds.data.batching import GlobalBatchSampler, collate
from rosa_ds.dist import all_reduce_sum, barrier
from rosa_ds.engine import Built, build_engine
from rosa_ds.evaluate import heldout_loss, task_metric
from rosa_ds.preflight import Prepared, prepare
from rosa_ds.tracking import MetricsLog


def quiet_libraries() -> None:
    import logging
    import warnings

    import transformers
    from deepspeed.utils import logger as ds_logger

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def evaluate_all(
    cfg: RunConfig, built: Built, prep: Prepared, with_metric: bool
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    p = built.placement
    pad = built.tokenizer.pad_token_id
    results = heldout_loss(
        built.model,
        prep.eval_examples,
        cfg.train.micro_batch_size,
        pad,
        p.rank,
        p.world_size,
        cfg.eval.max_loss_examples,
    )
    samples: list[dict[str, Any]] = []
    if with_metric and prep.data.metric != "none" and cfg.eval.num_generate:
        value, samples = task_metric(
            built.model,
            built.tokenizer,
            prep.data.eval,
            prep.data.metric,
            num=cfg.eval.num_generate,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            use_chat_template=cfg.data.chat_template,
            rank=p.rank,
            world=p.world_size,
            synced=built.zero_stage == 3 and p.world_size > 1,
        )
        results[prep.data.metric] = value
    return results, samples


def parameter_elements(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter elements this rank holds, and the model's total (they differ under ZeRO-3)."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def adapter_writer(cfg: RunConfig, built: Built):
    """A function that gathers the adapter (every rank) and writes it (rank 0) into a folder."""

    def write(folder: Path) -> None:
        state = gather_adapter_state(built.model, has_optimizer=True)
        if built.placement.rank == 0:
            save_adapter(folder, state, adapter_meta(built.model, cfg.model.name_or_path))

    return write


def train(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns the summary that rank 0 prints."""
    prep = prepare(cfg, resume=resume, training=True)
    quiet_libraries()
    built = build_engine(cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=True)
    engine, p = built.engine, built.placement
    main = p.rank == 0
    out = Path(cfg.output_dir)
    sampler = GlobalBatchSampler(
        len(prep.train_examples),
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        p.rank,
        p.world_size,
        cfg.seed,
    )
    log = MetricsLog(out, enabled=main)
    write_adapter = adapter_writer(cfg, built)
    start, history = 0, {}
    if prep.resume_from is not None:
        state = load_checkpoint(engine, prep.resume_from)
        start, history = state["step"], state.get("history", {})
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    if start == 0:
        before, samples = evaluate_all(cfg, built, prep, with_metric=cfg.eval.before_training)
        history["before"] = before
        log.log(0, **before)
    device = engine.device
    pad = built.tokenizer.pad_token_id
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=start,
        disable=not main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    t0 = time.time()
    losses: list[float] = history.get("losses", [])
    last_saved = start if prep.resume_from is not None else -1
    engine.train()
    for step in range(start, cfg.train.max_steps):
        step_loss = 0.0
        micro = sampler.micro_batches(step)
        for indices in micro:
            batch = collate([prep.train_examples[i] for i in indices], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / len(micro)
        (step_loss,) = all_reduce_sum([step_loss / p.world_size])
        losses.append(step_loss)
        done = step + 1
        lr = engine.get_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if done % cfg.train.log_every == 0:
            norm = engine.get_global_grad_norm()
            log.log(
                done,
                loss=step_loss,
                lr=lr,
                grad_norm=float(norm) if norm is not None else float("nan"),
            )
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps:
            mid, _ = evaluate_all(cfg, built, prep, with_metric=False)
            log.log(done, **mid)
        if cfg.train.save_every and done % cfg.train.save_every == 0:
            history["losses"] = losses
            save_checkpoint(
                engine,
                out,
                done,
                {"step": done, "history": history},
                write_adapter,
                cfg.train.keep_checkpoints,
            )
            last_saved = done
    bar.close()
    elapsed = time.time() - t0
    history["losses"] = losses
    if last_saved != cfg.train.max_steps:
        ckpt = save_checkpoint(
            engine,
            out,
            cfg.train.max_steps,
            {"step": cfg.train.max_steps, "history": history},
            write_adapter,
            cfg.train.keep_checkpoints,
        )
    else:
        ckpt = out / "checkpoints" / f"step-{cfg.train.max_steps:06d}"
    write_adapter(out / "adapter")
    after, samples = evaluate_all(cfg, built, prep, with_metric=True)
    history["after"] = after
    log.log(cfg.train.max_steps, **{f"final_{k}": v for k, v in after.items()})
    log.close()
    local, total = parameter_elements(built.model)
    summary = {
        "steps": cfg.train.max_steps,
        "resumed_from": start,
        "train_seconds": round(elapsed, 2),
        "world_size": p.world_size,
        "zero_stage": built.zero_stage,
        "param_elements_local": local,
        "param_elements_total": total,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "before": history.get("before"),
        "after": after,
        "checkpoint": str(ckpt),
        "adapter": str(out / "adapter"),
        "samples": samples[:3],
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    barrier()
    return summary


def evaluate(cfg: RunConfig, adapter_dir: str | None) -> dict[str, Any]:
    """Held-out loss, perplexity and task metric of the base model plus an adapter (if given)."""
    from rosa_ds.adapters.io import load_adapter

    prep = prepare(cfg, resume=None, training=False)
    state = None
    if adapter_dir is None and (Path(cfg.output_dir) / "adapter").is_dir():
        adapter_dir = str(Path(cfg.output_dir) / "adapter")
    if adapter_dir is not None:
        state, _ = load_adapter(adapter_dir)
    quiet_libraries()
    built = build_engine(
        cfg, prep.model_path, prep.tokenizer, prep.hidden_size, training=False, adapter_state=state
    )
    with torch.no_grad():
        results, samples = evaluate_all(cfg, built, prep, with_metric=True)
    return {"adapter": adapter_dir, **results, "samples": samples[:3]}
