"""Real multi-process runs through real launchers (gloo on CPU): loss goes down, ZeRO-3 equals
one process, resume continues the same loss curve, and a ZeRO-3 adapter is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_ds.checkpoint import LATEST, checkpoint_root, latest_checkpoint, tag_for
from tests.helpers import LORA_REFERENCE, train_ok

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = LORA_REFERENCE  # the shared uninterrupted runs' arguments (conftest.reference_run)


def _first_last(losses: list[float]) -> tuple[float, float]:
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


@pytest.fixture(scope="module")
def zero3_run(reference_run) -> tuple[Path, dict]:
    return reference_run("zero3", 2)


@pytest.fixture(scope="module")
def single_run(reference_run) -> tuple[Path, dict]:
    return reference_run("zero2", 1)


def test_zero2_two_ranks_deepspeed_launcher_loss_decreases(tmp_path):
    out = tmp_path / "run"
    summary = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero2", "eval.num_generate=4"],
        nproc=2,
        launcher="deepspeed",
    )
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert summary["param_elements_local"] == summary["param_elements_total"]
    first, last = _first_last(summary["losses"])
    assert last < first - 0.1, summary["losses"]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_mpirun_two_ranks_match_one_process(single_run, tmp_path):
    """mpirun -n 2 where rosa-ds sees none of the rank variables it knows: mpi4py finds the
    ranks, and the 2 ranks train exactly like one process."""
    out = tmp_path / "run"
    summary = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero2"],
        nproc=2,
        launcher="mpirun-hidden-vars",
    )
    assert summary["world_size"] == 2
    torch.testing.assert_close(
        torch.tensor(summary["losses"]), torch.tensor(single_run[1]["losses"]), rtol=1e-4, atol=1e-5
    )


def test_zero3_two_ranks_loss_decreases(zero3_run):
    _, summary = zero3_run
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    # Partitioned: each rank holds about half of the parameters (tiny ones stay whole).
    share = summary["param_elements_local"] / summary["param_elements_total"]
    assert 0.45 < share < 0.6, share
    first, last = _first_last(summary["losses"])
    assert last < first - 0.1, summary["losses"]


def test_zero3_matches_single_process(zero3_run, single_run):
    (z3_dir, z3), (one_dir, one) = zero3_run, single_run
    assert one["world_size"] == 1
    torch.testing.assert_close(
        torch.tensor(z3["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5
    )
    a = load_file(str(z3_dir / "adapter" / "adapter.safetensors"))
    b = load_file(str(one_dir / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 7 linear layers x 2 blocks, A and B
    for key in a:
        assert a[key].abs().sum() > 0, f"{key} was saved empty"
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_zero3_adapter_is_complete_with_full_shapes(zero3_run, tiny_model_path):
    from transformers import AutoConfig

    out, _ = zero3_run
    cfg = AutoConfig.from_pretrained(tiny_model_path)
    state = load_file(str(out / "adapter" / "adapter.safetensors"))
    a = state["model.layers.0.mlp.up_proj.lora_A"]
    b = state["model.layers.0.mlp.up_proj.lora_B"]
    assert a.shape == (8, cfg.hidden_size) and b.shape == (cfg.intermediate_size, 8)
    assert (b != 0).float().mean() > 0.9  # trained everywhere, not a partial shard


def test_zero3_resume_continues_the_same_losses(zero3_run, tmp_path):
    """Cut the 8-step run back to its step-4 checkpoint, resume on 2 ranks: same steps 5..8."""
    src, full = zero3_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    root = checkpoint_root(out)
    shutil.rmtree(root / tag_for(8))
    (root / LATEST).write_text(tag_for(4))
    (out / "summary.json").unlink()
    assert latest_checkpoint(out) == root / tag_for(4)
    resumed = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero3", "--resume"],
        nproc=2,
        launcher="torchrun",
    )
    assert resumed["resumed_from"] == 4 and len(resumed["losses"]) == 8
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-6
    )
    a = load_file(str(out / "adapter" / "adapter.safetensors"))
    b = load_file(str(src / "adapter" / "adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_zero3_cpu_offload_bf16_two_ranks(tmp_path):
    out = tmp_path / "run"
    summary = train_ok(
        [
            "--config",
            "tiny-lora",
            f"output_dir={out}",
            "deepspeed.config=zero3_offload",
            "train.precision=bf16",
            "train.max_steps=6",
            "train.lr=1e-2",
            "eval.num_generate=0",
        ],
        nproc=2,
        launcher="torchrun",
    )
    assert summary["zero_stage"] == 3
    first, last = _first_last(summary["losses"])
    assert last < first - 0.1, summary["losses"]
    state = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


def _first_step(out: Path) -> tuple[float, float]:
    """(loss, gradient norm) that a run logged for its first optimizer step."""
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 1 and "loss" in record:
            return record["loss"], record["grad_norm"]
    raise AssertionError(f"{out} logged no first step")


def test_the_step_loss_is_the_mean_over_the_global_batchs_label_tokens(
    single_run, zero3_run, tmp_path
):
    """The same global batch of 8 examples at micro-batch 1 (8 accumulation steps) and 2 (4;
    and 2 ranks x 2 under ZeRO-3): one loss, the mean over its label tokens (computed
    here from the base model, which a fresh LoRA leaves unchanged), and one gradient norm."""
    from transformers import AutoModelForCausalLM

    from rosa_ds.config import load_config
    from rosa_ds.data.batching import GlobalBatchSampler, collate, label_tokens
    from rosa_ds.preflight import prepare

    runs = {"micro 2, 1 rank": single_run[0], "micro 2, 2 ranks ZeRO-3": zero3_run[0]}
    for micro in (1,):
        out = tmp_path / f"micro-{micro}"
        train_ok([*COMMON, f"output_dir={out}", "train.max_steps=1", "train.save_every=1",
                  f"train.micro_batch_size={micro}"])  # fmt: skip
        runs[f"micro {micro}, 1 rank"] = out
    figures = {name: _first_step(out) for name, out in runs.items()}

    cfg = load_config(COMMON[1], COMMON[2:])
    prep = prepare(cfg, resume=None, training=False)
    t = cfg.train
    sampler = GlobalBatchSampler(len(prep.train_examples), t.global_batch_size, 1, 0, 1, cfg.seed)
    batch = [prep.train_examples[i] for i in sampler.global_batch_indices(0)]
    counts = [label_tokens(ex) for ex in batch]
    model = AutoModelForCausalLM.from_pretrained(prep.model_path, dtype=torch.float32)
    with torch.no_grad():
        means = [float(model(**collate([ex], 0)).loss) for ex in batch]
    token_mean = sum(m * n for m, n in zip(means, counts, strict=True)) / sum(counts)
    example_mean = sum(means) / len(means)
    assert abs(example_mean - token_mean) > 1e-4 * token_mean, "lengths too alike to tell"
    for name, (loss, norm) in figures.items():
        assert loss == pytest.approx(token_mean, rel=1e-5), (name, figures)
        assert norm == pytest.approx(figures["micro 2, 1 rank"][1], rel=1e-4), (name, figures)
