"""The training loop: evaluate, run each pass of optimizer steps the method plans, checkpoint,
write the adapter, evaluate again. It knows no method: everything a method does differently
is behind the hooks of ``rosa_ds.methods.base.Method``.

Each optimizer step consumes one global batch from the step-indexed sampler (so resuming from
step N continues with batch N); each micro-batch is a DeepSpeed ``backward`` + ``step`` (DeepSpeed
steps the optimizer and the schedule at the accumulation boundary).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rosa_ds import faults, precision
from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.masks import masks_of
from rosa_ds.checkpoint import load_checkpoint, read_state, save_checkpoint
from rosa_ds.config import RunConfig, dump_config
from rosa_ds.data.batching import GlobalBatchSampler, collate, label_tokens, model_inputs
from rosa_ds.dist import all_reduce_max, all_reduce_sum, barrier, detect_placement, init_distributed
from rosa_ds.engine import Built, EngineOptions, build_engine
from rosa_ds.errors import TrainingError
from rosa_ds.evaluate import evaluate_all
from rosa_ds.methods import Method, Progress, Run, Segment, build_method
from rosa_ds.numerics import NonFiniteGuard, nonfinite_trainable
from rosa_ds.precision import PrecisionChoice
from rosa_ds.preemption import Preempted, StopRequest
from rosa_ds.preflight import Prepared, auto_resume, prepare, resolve_epochs
from rosa_ds.telemetry import ModelFlops, StepMeter, peak_flops, peak_memory, rss_now
from rosa_ds.tracking import MetricsLog, quiet_libraries
from rosa_ds.watchdog import Watchdog
from rosa_ds.zero_params import local_numel


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


def optimizer_step(
    built: Built,
    prep: Prepared,
    sampler: GlobalBatchSampler,
    step: int,
    meter: StepMeter | None = None,
) -> float:
    """One optimizer step: this rank's micro-batches of global batch ``step``, each a DeepSpeed
    backward + step (DeepSpeed steps the optimizer at the boundary). Returns this rank's mean
    micro-batch loss; ``meter`` counts the tokens and FLOPs.

    The loss is token-weighted over the global batch: each micro-batch's summed token loss is
    divided by the global batch's label tokens (every rank counts them from the sampler, no
    collective), times the accumulation steps and ranks that DeepSpeed divides by again. So
    the step's loss and gradient are the mean over its label tokens at any micro-batch size,
    accumulation and world size, and a short example weighs what its tokens weigh."""
    engine = built.engine
    micro = sampler.micro_batches(step)
    examples = prep.train_examples
    labels = sum(label_tokens(examples[i]) for i in sampler.global_batch_indices(step))
    per_micro = max(labels, 1) / (len(micro) * built.placement.world_size)
    total = 0.0
    for indices in micro:
        batch = collate([examples[i] for i in indices], built.tokenizer.pad_token_id)
        if meter is not None:
            meter.count(batch)
        batch = {k: v.to(engine.device) for k, v in model_inputs(batch).items()}
        out = engine(**batch, num_items_in_batch=per_micro)
        loss = faults.corrupt_loss(out.loss, step + 1)
        with faults.corrupt_gradient(built.model, step + 1):
            engine.backward(loss)
        if indices is micro[0]:
            faults.signal_if(built.placement.rank, step + 1)
        engine.step()
        total += float(loss.detach())
    return total / len(micro)


def parameter_elements(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter elements this rank holds, and the model's total (they differ under ZeRO-3)."""
    counts = [local_numel(p) for p in model.parameters()]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def mask_index_elements(model: torch.nn.Module) -> tuple[int, int]:
    """Mask index entries (int32) the most loaded rank holds, and the masks' total: under
    ZeRO-3 each rank keeps only its partition of them, as of any parameter."""
    modules = adapted_modules(model).values()
    counts = [local_numel(m.mask_index) for m in modules if m.mask_index is not None]
    (most,) = all_reduce_max([float(sum(c[0] for c in counts))])
    return int(most), sum(c[1] for c in counts)


def trainable_elements(model: torch.nn.Module) -> int:
    """Trainable elements of the whole model (every rank's partitions together)."""
    return sum(local_numel(p)[1] for p in model.parameters() if p.requires_grad)


class Trainer:
    """Runs the passes a method plans; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        prep: Prepared,
        precision_choice: PrecisionChoice | None = None,
        method: Method | None = None,
    ) -> None:
        self.cfg = cfg
        self.prep = prep
        self.precision_choice = precision_choice  # for the summary; None in probes
        self.out = Path(cfg.output_dir)
        self.method = method or build_method(cfg, self.out)
        self.log: MetricsLog | None = None
        self.resumed_from = 0
        self.stop = StopRequest([])  # train() installs the configured signals
        self.meter: StepMeter | None = None  # tokens/s, MFU, memory; kept over the passes
        self.planned_peak_bytes: float | None = None  # the planner's peak, for the summary
        self.rss_start = 0.0  # the process before any model: libraries, data (CPU memory)

    # --- one segment of optimizer steps ----------------------------------------------------
    def run_steps(self, run: Run, segment: Segment) -> None:
        cfg, prep, method = self.cfg, self.prep, self.method
        built, progress = run.built, run.progress
        engine, p = built.engine, built.placement
        sampler = make_sampler(cfg, prep, built)
        losses = progress.history.setdefault(segment.losses, [])
        bar = tqdm(
            total=segment.end,
            initial=progress.step,
            disable=p.rank != 0,
            desc=segment.name,
            unit="step",
            dynamic_ncols=True,
        )
        guard = NonFiniteGuard(cfg.train.max_bad_steps)
        meter = self.start_meter(built)
        engine.train()
        method.start_segment(run, segment)
        try:
            while progress.step < segment.end:
                step_loss = optimizer_step(built, prep, sampler, progress.step, meter)
                meter.step_done()
                # the stop flag rides on the loss's all-reduce: a signal to any rank stops all
                step_loss, stops = all_reduce_sum(
                    [step_loss / p.world_size, float(self.stop.requested)]
                )
                losses.append(step_loss)
                progress.step += 1
                done = progress.step
                faults.kill_if(p.rank, done)
                faults.slow_if(done)
                if guard.check(done, step_loss, engine.was_step_applied()):
                    self.skipped(progress, guard, step_loss)
                lrs = dict(zip(built.group_names, engine.get_lr(), strict=True))
                lr = next(iter(lrs.values()))
                bar.update(1)
                if done % cfg.train.log_every == 0:
                    norm = engine.get_global_grad_norm()
                    figures = self.measure(meter)
                    bar.set_postfix(
                        loss=f"{step_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{figures['tokens_per_second']:.0f}",
                    )
                    self.log.log(
                        done,
                        phase=progress.phase,
                        loss=step_loss,
                        lr=lr,
                        **{f"lr_{role}": lrs[role] for role in built.group_names[1:]},
                        grad_norm=float(norm) if norm is not None else float("nan"),
                        **figures,
                    )
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < segment.end:
                    with meter.paused():
                        mid, _ = evaluate_all(cfg, built, prep, with_metric=False)
                    self.log.log(done, phase=progress.phase, **mid)
                method.after_step(run, segment)
                every = cfg.train.save_every
                if stops and segment.save:  # else (mask collection): at the next save point
                    self.stop_here(run)
                if segment.save and every and done % every == 0 and done < segment.end:
                    with meter.paused():
                        self.save(run)
        finally:
            bar.close()  # an error message then starts on a line of its own
        method.end_segment(run, segment)

    def start_meter(self, built: Built) -> StepMeter:
        """The meter for a segment: FLOPs from this pass's model (masks attached or not)."""
        flops = ModelFlops.of(built.model)
        if self.meter is None:
            peak = peak_flops(self.cfg.train.precision, self.cfg.train.peak_tflops)
            self.meter = StepMeter(flops, peak, built.placement.world_size)
        self.meter.flops = flops
        self.meter.restart()
        return self.meter

    def measure(self, meter: StepMeter) -> dict[str, float]:
        """The logged interval's throughput, MFU and peak memory over every rank (a collective:
        every rank calls it at the same steps)."""
        summed = all_reduce_sum(meter.local())
        memory = peak_memory()
        maxed = all_reduce_max(list(memory.values()))
        return meter.report(summed, dict(zip(memory, maxed, strict=True)))

    def stop_agreed(self) -> bool:
        """Did any rank receive a stop signal? (a collective: every rank calls it)"""
        (stops,) = all_reduce_sum([float(self.stop.requested)])
        return stops > 0

    def stop_here(self, run: Run, folder: Path | None = None) -> None:
        """Every rank: write the stop checkpoint (unless ``folder`` is one just written) and
        leave with ``Preempted``."""
        folder = folder or self.save(run)
        self.log.log(run.progress.step, phase=run.progress.phase, preempted=1)
        self.log.close()
        why = (
            f"{self.stop.signal_name} received {self.stop.seconds_since():.1f} s before"
            if self.stop.requested
            else "a stop signal reached another rank"
        )
        raise Preempted(
            f"stopped after step {run.progress.step} ({why}): checkpoint {folder} written; "
            "continue with --resume (or train.auto_resume=true)"
        )

    def skipped(self, progress: Progress, guard: NonFiniteGuard, loss: float) -> None:
        done = progress.step
        progress.history.setdefault("skipped_steps", []).append(done)
        self.log.log(done, phase=progress.phase, skipped=1, loss=loss)
        if detect_placement().rank == 0:
            tqdm.write(
                f"step {done}: non-finite loss or gradient, step skipped "
                f"({guard.in_a_row} in a row, train.max_bad_steps={guard.max_bad_steps})",
                file=sys.stderr,
            )

    def save(self, run: Run) -> Path:
        built, progress = run.built, run.progress
        bad = nonfinite_trainable(built.model)
        if bad:
            raise TrainingError(
                f"{bad} adapter tensor(s) hold NaN or Inf at step {progress.step}; no checkpoint "
                "written. Continue from the last checkpoint with --resume and a lower train.lr"
            )
        return save_checkpoint(
            built.engine,
            self.out,
            progress.step,
            progress.state(),
            lambda folder: self.method.checkpoint_extras(run, folder),
            self.cfg.train.keep_checkpoints,
            masks=masks_of(built.model, keep=built.placement.rank == 0),
            tag_prefix="step" if progress.phase == "train" else progress.phase,
        )

    # --- the passes ------------------------------------------------------------------------
    def build(self, options: EngineOptions) -> Built:
        prep = self.prep
        return build_engine(
            self.cfg,
            prep.model_path,
            prep.tokenizer,
            prep.hidden_size,
            training=True,
            options=options,
        )

    def run(self, resume_from: Path | None) -> dict[str, Any]:
        cfg, prep, method = self.cfg, self.prep, self.method
        progress = Progress(method.first_phase(), 0)
        if resume_from is not None:
            state = read_state(resume_from)
            progress = Progress(state.get("phase", "train"), state["step"], state["history"])
        method.resume(progress, resume_from)
        main = detect_placement().rank == 0
        self.rss_start = rss_now()
        t = cfg.train
        self.log = MetricsLog(
            self.out, main, t.trackers, t.project, dataclasses.asdict(cfg) if main else None
        )
        steps_per_epoch = len(prep.train_examples) // cfg.train.global_batch_size
        fresh_pass = False
        t0 = time.time()
        while True:
            built = self.build(method.engine_options(progress))
            run = Run(built, progress, self.log, steps_per_epoch)
            if resume_from is not None:
                load_checkpoint(built.engine, resume_from)
                method.restore(run, resume_from)
                resume_from = None
            elif main and not (self.out / "config.yaml").exists():
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(dump_config(cfg))
            if "before" not in progress.history:
                before, _ = evaluate_all(cfg, built, prep, with_metric=cfg.eval.before_training)
                progress.history["before"] = before
                self.log.log(0, **before)
            if fresh_pass:  # the first state of a new pass is a checkpoint of its own
                if self.stop_agreed():
                    self.stop_here(run)
                self.save(run)
            method.start_pass(run)
            for segment in method.segments(progress):
                self.run_steps(run, segment)
            if not method.end_pass(run):
                break
            fresh_pass = True
            built.release()
            del built, run
            gc.collect()
        elapsed = time.time() - t0
        ckpt = self.save(run)
        method.final_adapter(run, self.out / "adapter")
        if self.stop_agreed():  # the final evaluation is left to the resumed run
            self.stop_here(run, ckpt)
        after, samples = evaluate_all(cfg, built, prep, with_metric=True)
        progress.history["after"] = after
        self.log.log(progress.step, **{f"final_{k}": v for k, v in after.items()})
        self.log.close()
        return self.summary(built, progress, ckpt, elapsed, samples)

    def telemetry_summary(self) -> dict[str, Any]:
        """The medians of the logged steps, the peak memory and, where the planner modelled the
        run, its peak beside the measured one (this run's steps only, after a resume). A
        collective: every rank calls it."""
        out = self.meter.summary() if self.meter is not None else {}
        measured = out.get("peak_allocated_bytes")
        if "peak_rss_bytes" in out:  # on a CPU what the run added to the process, as planned
            (start,) = all_reduce_max([self.rss_start])
            measured = out["peak_rss_above_start_bytes"] = out["peak_rss_bytes"] - start
        out["planned_peak_bytes"] = self.planned_peak_bytes
        if measured and self.planned_peak_bytes:
            out["measured_over_planned"] = measured / self.planned_peak_bytes
        return out

    def summary(
        self, built: Built, progress: Progress, ckpt: Path, elapsed: float, samples: list
    ) -> dict[str, Any]:
        local, total = parameter_elements(built.model)
        mask_local, mask_total = mask_index_elements(built.model)
        h = progress.history
        losses = h.get("losses", [])
        summary = {
            "method": self.method.name,
            "steps": self.cfg.train.max_steps,
            "resumed_from": self.resumed_from,
            "train_seconds": round(elapsed, 2),
            "world_size": built.placement.world_size,
            "zero_stage": built.zero_stage,
            "precision": self.precision_choice.to_dict() if self.precision_choice else None,
            "param_elements_local": local,
            "param_elements_total": total,
            "trainable_elements": trainable_elements(built.model),
            "mask_index_elements_max_rank": mask_local,
            "mask_index_elements_total": mask_total,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": losses,
            "skipped_steps": h.get("skipped_steps", []),
            "telemetry": self.telemetry_summary(),
            **self.method.summary(progress),
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


def train(
    cfg: RunConfig,
    resume: str | None = None,
    plan_peak: Callable[[RunConfig, int], float | None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training job; returns the summary that rank 0 prints. ``plan_peak``
    (the command line passes the planner's) gives the planned peak memory per rank of the
    resolved config at a world size, compared with the measured peak in the summary."""
    resume = auto_resume(cfg, resume)
    resumed_config = Path(cfg.output_dir) / "config.yaml" if resume is not None else None
    cfg, choice = precision.resolve(cfg, resumed_config=resumed_config)
    prep = prepare(cfg, resume=resume, training=True)
    epochs = resolve_epochs(cfg, len(prep.train_examples))
    quiet_libraries()
    trainer = Trainer(cfg, prep, choice)
    trainer.resumed_from = read_state(prep.resume_from)["step"] if prep.resume_from else 0
    placement = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.comm_timeout_minutes)
    precision.check_ranks_agree(choice)
    if plan_peak is not None:
        trainer.planned_peak_bytes = plan_peak(cfg, placement.world_size)
    if placement.rank == 0:
        precision.announce(choice, cfg)
        if epochs:
            print(f"rosa-ds: {epochs}", file=sys.stderr)
        for line in (prep.data.describe(), prep.tokenized):  # after pre-flight: a bad input
            if line:  # stays one line
                print(f"rosa-ds: {line}", file=sys.stderr)
    watchdog = Watchdog(
        placement.rank,
        placement.world_size,
        cfg.deepspeed.heartbeat_timeout,
        resume_hint="continue from the last checkpoint with --resume",
    ).start()
    trainer.stop = StopRequest(cfg.train.stop_signals, placement.rank, cfg.train.stop_timeout)
    trainer.stop.install()
    try:
        summary = trainer.run(prep.resume_from)
    except Preempted:
        # every rank stops here at the same step: a clean end. A launcher's late SIGTERM (or a
        # second stop signal) must not kill a rank that is leaving with code 75 anyway
        trainer.stop.ignore_from_now()
        watchdog.finish()
        raise
    except BaseException as exc:
        trainer.stop.restore()
        watchdog.fail(exc)
        raise
    trainer.stop.restore()
    watchdog.finish()
    return summary
