"""Telemetry: the FLOPs count follows the planner's matmul shapes, the token counts are the
global batch's, and a real 2-rank run's summary carries throughput, MFU and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rosa_ds.telemetry import ModelFlops, StepMeter, batch_counts
from tests.helpers import LORA_REFERENCE, child_env, train_ok


def _tiny_adapted(rank: int, density: float = 0.0):
    from transformers import AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.config import AdapterConfig, ModelConfig
    from rosa_ds.kernels.csr import SparseStructure
    from rosa_ds.model import resolve_model_path

    path = resolve_model_path(ModelConfig(name_or_path="builtin:tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(path)
    inject_adapters(model, AdapterConfig(rank=rank))
    nnz = 0
    if density:
        for m in adapted_modules(model).values():
            count = round(density * m.out_features * m.in_features)
            flat = torch.randperm(m.out_features * m.in_features)[:count]
            m.attach_mask(SparseStructure.from_flat_indices(flat, (m.out_features, m.in_features)))
            nnz += count
    return model, nnz


@pytest.mark.parametrize(("rank", "density"), [(8, 0.0), (4, 0.05)])
def test_model_flops_follow_the_planners_shapes(rank, density):
    """Per token: frozen linears forward + input gradient (2 x 2 o i), adapters forward and
    both gradients (3 x ...), the frozen head 2 x 2 V h; attention 3 x 4 L q_dim per context."""
    from rosa_ds.plan import PRESETS

    shape = PRESETS["tiny-llama"]
    model, nnz = _tiny_adapted(rank, density)
    flops = ModelFlops.of(model)
    per_layer = sum(
        2 * 2 * o * i + 3 * 2 * rank * (o + i) for o, i in shape.linear_shapes().values()
    )
    head = 2 * 2 * shape.vocab * shape.hidden
    assert flops.per_token == pytest.approx(shape.layers * per_layer + head + 3 * 2 * nnz)
    q_dim = shape.heads * shape.d_head
    assert flops.attention_per_token_context == pytest.approx(3 * 4 * shape.layers * q_dim)
    # the planner's step time counts the same FLOPs, from the shapes alone
    from rosa_ds.plan import PlanInputs, flops_per_token

    seq = 96
    planned = flops_per_token(PlanInputs(model=shape, rank=rank, density=density, seq_len=seq))
    assert planned == pytest.approx(flops.step(seq, seq * seq) / seq)


def test_batch_counts_leave_out_padding_and_unlabelled_tokens():
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, -100, -100, -100]]),
    }
    assert batch_counts(batch) == (7, 4, 25 + 4)


def test_step_meter_reports_rates_without_paused_time(monkeypatch):
    meter = StepMeter(ModelFlops(per_token=1e12, attention_per_token_context=0.0), 4e12, 2)
    clock = iter([0.0, 10.0, 14.0, 20.0, 20.0])  # pause 10-14, report at 20: 16 s of steps
    monkeypatch.setattr("rosa_ds.telemetry.time.perf_counter", lambda: next(clock))
    meter.restart()
    for _ in range(4):
        meter.step_done()
    with meter.paused():
        pass
    out = meter.report([1600.0, 800.0, 3.2e15], {"peak_rss_bytes": 5.0})
    assert out["step_seconds"] == pytest.approx(4.0)
    assert out["tokens_per_second"] == pytest.approx(100.0)
    assert out["label_tokens_per_second"] == pytest.approx(50.0)
    assert out["tokens_per_second_per_rank"] == pytest.approx(50.0)
    assert out["mfu"] == pytest.approx(3.2e15 / 16 / 2 / 4e12)
    assert meter.summary()["peak_rss_bytes"] == 5.0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_run_logs_the_global_batch_tokens_mfu_and_peak_memory(tmp_path):
    """2 ranks, ZeRO-2: each logged step's tokens/s x step seconds is the global batch's
    non-pad token count (both ranks' micro-batches); MFU and peak memory are in summary.json."""
    from rosa_ds.config import load_config
    from rosa_ds.data.batching import GlobalBatchSampler, collate
    from rosa_ds.preflight import prepare

    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    args = [
        *LORA_REFERENCE,
        "deepspeed.config=zero2",
        "train.peak_tflops=0.01",
        "train.trackers=[tensorboard,mlflow]",
        f"output_dir={out}",
    ]
    summary = train_ok(args, nproc=2, launcher="ranks")
    tel = summary["telemetry"]
    for key in ("median_tokens_per_second", "median_label_tokens_per_second", "median_mfu"):
        assert tel[key] > 0, tel
    assert tel["peak_rss_bytes"] > tel["peak_rss_above_start_bytes"] > 0
    assert tel["planned_peak_bytes"] > 0 and tel["measured_over_planned"] > 0

    cfg = load_config("tiny-lora", [a for a in args[2:]])
    prep = prepare(cfg, resume=None, training=False)
    t = cfg.train
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "tokens_per_second" in r]
    assert len(steps) == t.max_steps
    for record in steps:
        tokens = labels = 0
        for rank in range(2):
            sampler = GlobalBatchSampler(
                len(prep.train_examples), t.global_batch_size, t.micro_batch_size, rank, 2, cfg.seed
            )
            for indices in sampler.micro_batches(record["step"] - 1):
                batch = collate([prep.train_examples[i] for i in indices], 0)
                n, lab, _ = batch_counts(batch)
                tokens, labels = tokens + n, labels + lab
        seconds = record["step_seconds"]
        assert record["tokens_per_second"] * seconds == pytest.approx(tokens, rel=1e-6)
        assert record["label_tokens_per_second"] * seconds == pytest.approx(labels, rel=1e-6)
        assert 0 < record["mfu"] < 1

    # MLflow (through accelerate's tracker, on rank 0) holds the same curve as metrics.jsonl
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the run wrote
    client = mlflow.MlflowClient((out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "rosa-ds"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["train.max_steps"] == str(t.max_steps)
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == pytest.approx(summary["losses"], rel=1e-6)


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after():
    """The autotuner's eager ``import mlflow`` costs every rank over a second at start-up."""
    pytest.importorskip("mlflow")
    probe = (
        "import sys, rosa_ds, deepspeed, deepspeed.autotuning.autotuner as tuner\n"
        "print('mlflow' in sys.modules, tuner.has_mlflow)\n"
        "import mlflow\n"
        "print(hasattr(mlflow, 'MlflowClient'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False", "True"]


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_install(monkeypatch):
    from rosa_ds import tracking
    from rosa_ds.errors import UserError

    monkeypatch.setitem(tracking.PACKAGES, "wandb", "wandb_not_installed_anywhere")
    with pytest.raises(UserError, match="pip install wandb, or drop wandb from train.trackers"):
        tracking.check_trackers(["tensorboard", "wandb"])
    tracking.check_trackers(["tensorboard"])


def test_wandb_offline_run_receives_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rosa_ds.tracking import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, True, ["wandb"], "rosa-ds-test", {"train": {"lr": 0.1}})
    run = log._trackers[0].tracker
    for step in (1, 2, 0):  # a restarted main pass: W&B still gets growing steps
        log.log(step, loss=1.0 / (step + 1))
    assert run.config["train.lr"] == 0.1
    assert run.summary["loss"] == pytest.approx(1.0) and run.summary["train_step"] == 0
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
