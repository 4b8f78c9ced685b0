"""The training loop and its phase schedule: evaluate, (warm up, collect, choose masks,)
train ``max_steps`` optimizer steps, checkpoint, evaluate again.

Robust adaptation adds a ``warmup`` phase before the main pass: LoRA alone for
``mask_warmup_steps``, then ``mask_grad_steps`` steps with gradient collection, then the masks;
the engine is rebuilt with them and training goes on from step 0 (``restart``) or from where it
was (``continue``).

Each optimizer step consumes one global batch from the step-indexed sampler (so resuming from
step N continues with batch N); each micro-batch is a DeepSpeed ``backward`` + ``step`` (DeepSpeed
steps the optimizer and the schedule at the accumulation boundary).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rosa_ds import faults, precision
from rosa_ds.adapters.io import adapter_meta, gather_adapter_state, save_adapter, structure_state
from rosa_ds.adapters.masks import GradientCollector, load_masks, masks_of, save_masks
from rosa_ds.adapters.resample import resample_all, reset_optimizer_group
from rosa_ds.adapters.subspace_io import (
    read_frozen_weights,
    write_frozen_weights,
    write_subspace_adapter,
)
from rosa_ds.checkpoint import (
    FROZEN_FILE,
    MASK_FILE,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from rosa_ds.config import RunConfig, dump_config
from rosa_ds.data.batching import GlobalBatchSampler, collate
from rosa_ds.dist import all_reduce_sum, barrier, detect_placement, init_distributed
from rosa_ds.engine import Built, build_engine
from rosa_ds.errors import TrainingError
from rosa_ds.evaluate import evaluate_all
from rosa_ds.kernels.csr import SparseStructure
from rosa_ds.numerics import NonFiniteGuard, nonfinite_trainable
from rosa_ds.precision import PrecisionChoice
from rosa_ds.preflight import Prepared, prepare
from rosa_ds.tracking import MetricsLog, quiet_libraries
from rosa_ds.watchdog import Watchdog


def make_sampler(cfg: RunConfig, prep: Prepared, built: Built) -> GlobalBatchSampler:
    p = built.placement
    return GlobalBatchSampler(
        len(prep.train_examples),
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        p.rank,
        p.world_size,
        cfg.seed,
    )


def optimizer_step(built: Built, prep: Prepared, sampler: GlobalBatchSampler, step: int) -> float:
    """One optimizer step: this rank's micro-batches of global batch ``step``, each a DeepSpeed
    backward + step (DeepSpeed steps the optimizer at the boundary). Returns this rank's mean
    micro-batch loss."""
    engine = built.engine
    micro = sampler.micro_batches(step)
    total = 0.0
    for indices in micro:
        batch = collate([prep.train_examples[i] for i in indices], built.tokenizer.pad_token_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = faults.corrupt_loss(engine(**batch).loss, step + 1)
        with faults.corrupt_gradient(built.model, step + 1):
            engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    return total / len(micro)


def refresh_lr(engine: Any) -> None:
    """Recompute the learning rates from the schedule at its current step (after a change to
    the re-warm-up, which the schedule would otherwise apply one step late)."""
    sched = engine.lr_scheduler
    for group, base_lr, fn in zip(
        sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * fn(sched.last_epoch)


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
            state.update(structure_state(built.model))
            save_adapter(folder, state, adapter_meta(built.model, cfg.model.name_or_path))

    return write


@dataclass
class Progress:
    """Where the run is: the phase, the next step, and what has been measured so far.

    Phases: ``warmup`` (LoRA alone, then gradient collection; robust adaptation only) and
    ``train`` (the main pass, with masks if there are any). Checkpoints store this.
    """

    phase: str
    step: int
    history: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "history": self.history}


class Trainer:
    def __init__(
        self, cfg: RunConfig, prep: Prepared, precision_choice: PrecisionChoice | None = None
    ) -> None:
        self.cfg = cfg
        self.prep = prep
        self.precision_choice = precision_choice  # for the summary; None in probes
        self.out = Path(cfg.output_dir)
        self.log: MetricsLog | None = None
        self.resumed_from = 0

    # --- one pass of optimizer steps -------------------------------------------------------
    def run_steps(
        self,
        built: Built,
        progress: Progress,
        end: int,
        *,
        key: str,
        collector: GradientCollector | None = None,
        save: bool = True,
    ) -> None:
        cfg, prep, engine, p = self.cfg, self.prep, built.engine, built.placement
        sampler = make_sampler(cfg, prep, built)
        losses = progress.history.setdefault(key, [])
        desc = {"losses": "train", "warmup_losses": "warm-up"}.get(key, key)
        if collector is not None:
            desc = "collect"
        bar = tqdm(
            total=end,
            initial=progress.step,
            disable=p.rank != 0,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
        )
        guard = NonFiniteGuard(cfg.train.max_bad_steps)
        engine.train()
        try:
            while progress.step < end:
                step_loss = optimizer_step(built, prep, sampler, progress.step)
                if collector is not None:
                    collector.count_micro_batch(sampler.global_batch // sampler.micro_batch)
                (step_loss,) = all_reduce_sum([step_loss / p.world_size])
                losses.append(step_loss)
                progress.step += 1
                done = progress.step
                faults.kill_if(p.rank, done)
                if guard.check(done, step_loss, engine.was_step_applied()):
                    progress.history.setdefault("skipped_steps", []).append(done)
                    self.log.log(done, phase=progress.phase, skipped=1, loss=step_loss)
                    if p.rank == 0:
                        tqdm.write(
                            f"step {done}: non-finite loss or gradient, step skipped "
                            f"({guard.in_a_row} in a row, train.max_bad_steps={guard.max_bad_steps})",
                            file=sys.stderr,
                        )
                lrs = engine.get_lr()  # per parameter group: low-rank, then sparse
                lr = lrs[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if done % cfg.train.log_every == 0:
                    norm = engine.get_global_grad_norm()
                    self.log.log(
                        done,
                        phase=progress.phase,
                        loss=step_loss,
                        lr=lr,
                        **({"lr_sparse": lrs[1]} if len(lrs) > 1 else {}),
                        grad_norm=float(norm) if norm is not None else float("nan"),
                    )
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < end:
                    mid, _ = evaluate_all(cfg, built, prep, with_metric=False)
                    self.log.log(done, phase=progress.phase, **mid)
                if self.resample_due(progress, end, sampler.steps_per_epoch):
                    self.resample(built, progress)
                if (
                    save
                    and cfg.train.save_every
                    and done % cfg.train.save_every == 0
                    and done < end
                ):
                    self.save(built, progress)
        finally:
            bar.close()  # an error message then starts on a line of its own

    def save(self, built: Built, progress: Progress) -> Path:
        bad = nonfinite_trainable(built.model)
        if bad:
            raise TrainingError(
                f"{bad} adapter tensor(s) hold NaN or Inf at step {progress.step}; no checkpoint "
                "written. Continue from the last checkpoint with --resume and a lower train.lr"
            )
        masks = masks_of(built.model)
        resampled = "resample" in progress.history

        def write_extras(folder: Path) -> None:
            if resampled:  # W_fixed is not the base model's weight any more
                write_frozen_weights(built, folder / FROZEN_FILE)
            else:
                adapter_writer(self.cfg, built)(folder / "adapter")

        return save_checkpoint(
            built.engine,
            self.out,
            progress.step,
            progress.state(),
            write_extras,
            self.cfg.train.keep_checkpoints,
            masks=masks,
            tag_prefix="warmup" if progress.phase == "warmup" else "step",
        )

    # --- subspace adaptation ---------------------------------------------------------------
    def resample_due(self, progress: Progress, end: int, steps_per_epoch: int) -> bool:
        a = self.cfg.adapter
        if not a.resampling or progress.phase != "train" or progress.step >= end:
            return False
        every = a.resample_every * (steps_per_epoch if a.subspace.unit == "epochs" else 1)
        return progress.step % every == 0

    def resample(self, built: Built, progress: Progress) -> None:
        """Merge, factorize and resample every low-rank adapter; reset the factors' Adam state."""
        sub = self.cfg.adapter.subspace
        state = progress.history.setdefault("resample", {"count": 0, "steps": [], "seconds": []})
        report = resample_all(
            built.model,
            sampling=sub.sampling,
            split=sub.split,
            seed=self.cfg.seed,
            count=state["count"],
            has_optimizer=True,
        )
        reset_optimizer_group(built.engine, 0)
        if built.rewarm is not None:
            built.rewarm.since = progress.step
            refresh_lr(built.engine)
        state["count"] += 1
        state["steps"].append(progress.step)
        state["seconds"].append(round(report.seconds, 4))
        state["indices"] = report.indices
        state["owners"] = report.owners
        requant = report.requant_summary()  # 4-bit frozen weights: the re-quantization error
        if requant is not None:
            state.setdefault("requant", []).append(requant)
        self.log.log(
            progress.step,
            phase="resample",
            resample_count=state["count"],
            resample_seconds=report.seconds,
            **{f"requant_{k}": v for k, v in (requant or {}).items()},
        )

    def restore_resample_state(self, built: Built, progress: Progress, folder: Path) -> None:
        state = progress.history.get("resample")
        if state and built.rewarm is not None and state["steps"]:
            built.rewarm.since = state["steps"][-1]
            refresh_lr(built.engine)
        if (folder / FROZEN_FILE).is_file():
            read_frozen_weights(built, folder / FROZEN_FILE)

    # --- the phase schedule ----------------------------------------------------------------
    def build(self, progress: Progress, masks, carry) -> Built:
        cfg, prep = self.cfg, self.prep
        warm = progress.phase == "warmup"
        robust = cfg.adapter.robust
        rank = robust.warmup_rank if warm and cfg.adapter.rank == 0 else None
        # a warm-up longer than a restarted main pass must not run past its schedule's end
        warm_steps = robust.mask_warmup_steps + robust.mask_grad_steps
        schedule = max(cfg.train.max_steps, warm_steps) if warm else None
        return build_engine(
            cfg,
            prep.model_path,
            prep.tokenizer,
            prep.hidden_size,
            training=True,
            adapter_state=carry,
            masks=None if warm else masks,
            rank=rank,
            start_step=progress.step if carry is not None else 0,
            schedule_steps=schedule,
        )

    def mask_phase(self, built: Built, progress: Progress) -> dict[str, SparseStructure]:
        """Warm up LoRA, collect frozen-weight gradients, choose the masks."""
        robust = self.cfg.adapter.robust
        warm_end = robust.mask_warmup_steps
        self.run_steps(built, progress, warm_end, key="warmup_losses")
        gas = built.engine.gradient_accumulation_steps()
        collector = GradientCollector(built.model, self.cfg.adapter, grad_scale=float(gas))
        collector.start()
        self.run_steps(
            built,
            progress,
            warm_end + robust.mask_grad_steps,
            key="warmup_losses",
            collector=collector,
            save=False,
        )
        collector.stop()
        masks = collector.select(self.cfg.adapter)
        progress.history["accumulator_bytes"] = {
            "local": collector.local_bytes(),
            "dense": collector.dense_bytes(),
        }
        progress.history["mask_nnz"] = sum(m.nnz for m in masks.values())
        if built.placement.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_masks(self.out / MASK_FILE, masks)
        self.log.log(
            progress.step,
            phase="mask",
            mask_nnz=progress.history["mask_nnz"],
            accumulator_bytes_local=collector.local_bytes(),
        )
        return masks

    def run(self, resume_from: Path | None) -> dict[str, Any]:
        cfg, prep = self.cfg, self.prep
        robust = cfg.adapter.robust
        masks = None
        progress = Progress("train", 0)
        if cfg.adapter.sparse:
            if robust.mask_file:
                masks = load_masks(robust.mask_file)
            else:
                progress.phase = "warmup"
        if resume_from is not None:
            state = read_state(resume_from)
            progress = Progress(state.get("phase", "train"), state["step"], state["history"])
            if (resume_from / MASK_FILE).is_file():
                masks = load_masks(resume_from / MASK_FILE)
        main = detect_placement().rank == 0
        self.log = MetricsLog(self.out, enabled=main)
        carry, fresh_pass = None, False
        t0 = time.time()
        while True:
            built = self.build(progress, masks, carry)
            if resume_from is not None:
                load_checkpoint(built.engine, resume_from)
                self.restore_resample_state(built, progress, resume_from)
                resume_from = None
            elif main and not (self.out / "config.yaml").exists():
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(dump_config(cfg))
            if "before" not in progress.history:
                before, _ = evaluate_all(cfg, built, prep, with_metric=cfg.eval.before_training)
                progress.history["before"] = before
                self.log.log(0, **before)
            if fresh_pass:  # the first state of the main pass is a checkpoint of its own
                self.save(built, progress)
            if progress.phase == "warmup":
                masks = self.mask_phase(built, progress)
                if robust.after_mask == "restart":
                    carry, progress.step = None, 0
                else:
                    carry = gather_adapter_state(built.model, has_optimizer=True)
                progress.phase, fresh_pass = "train", True
                built.engine.destroy()
                del built
                gc.collect()
                continue
            at_start = cfg.adapter.resampling and cfg.adapter.subspace.at_start
            if at_start and progress.step == 0 and "resample" not in progress.history:
                self.resample(built, progress)  # the reference factorizes at construction
            self.run_steps(built, progress, cfg.train.max_steps, key="losses")
            break
        elapsed = time.time() - t0
        ckpt = self.save(built, progress)
        if "resample" in progress.history:
            count = progress.history["resample"]["count"]
            write_subspace_adapter(cfg, built, self.out / "adapter", count)
        else:
            adapter_writer(cfg, built)(self.out / "adapter")
        after, samples = evaluate_all(cfg, built, prep, with_metric=True)
        progress.history["after"] = after
        self.log.log(progress.step, **{f"final_{k}": v for k, v in after.items()})
        self.log.close()
        return self.summary(built, progress, ckpt, elapsed, samples)

    def summary(
        self, built: Built, progress: Progress, ckpt: Path, elapsed: float, samples: list
    ) -> dict[str, Any]:
        local, total = parameter_elements(built.model)
        h = progress.history
        losses = h.get("losses", [])
        summary = {
            "steps": self.cfg.train.max_steps,
            "resumed_from": self.resumed_from,
            "train_seconds": round(elapsed, 2),
            "world_size": built.placement.world_size,
            "zero_stage": built.zero_stage,
            "precision": self.precision_choice.to_dict() if self.precision_choice else None,
            "param_elements_local": local,
            "param_elements_total": total,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": losses,
            "warmup_losses": h.get("warmup_losses", []),
            "skipped_steps": h.get("skipped_steps", []),
            "accumulator_bytes": h.get("accumulator_bytes"),
            "mask_nnz": h.get("mask_nnz"),
            "requant_errors": h.get("resample", {}).get("requant"),
            "before": h.get("before"),
            "after": h.get("after"),
            "checkpoint": str(ckpt),
            "adapter": str(self.out / "adapter"),
            "samples": samples[:3],
        }
        if built.placement.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        barrier()
        return summary


def train(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns the summary that rank 0 prints."""
    resumed_config = Path(cfg.output_dir) / "config.yaml" if resume is not None else None
    cfg, choice = precision.resolve(cfg, resumed_config=resumed_config)
    prep = prepare(cfg, resume=resume, training=True)
    quiet_libraries()
    trainer = Trainer(cfg, prep, choice)
    trainer.resumed_from = read_state(prep.resume_from)["step"] if prep.resume_from else 0
    placement = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.comm_timeout_minutes)
    precision.check_ranks_agree(choice)
    if placement.rank == 0:
        precision.announce(choice, cfg)
    watchdog = Watchdog(
        placement.rank,
        placement.world_size,
        cfg.deepspeed.heartbeat_timeout,
        resume_hint="continue from the last checkpoint with --resume",
    ).start()
    try:
        summary = trainer.run(prep.resume_from)
    except BaseException as exc:
        watchdog.fail(exc)
        raise
    watchdog.finish()
    return summary
