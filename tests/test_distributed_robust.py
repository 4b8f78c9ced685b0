"""Robust adaptation across real processes: the masks built by 2 ranks (ZeRO-2 and ZeRO-3)
equal the single-process masks, each rank holds half the accumulator (and under ZeRO-3 half the
mask indices), both ways of going on after the mask train, and resume keeps the mask."""

from __future__ import annotations

import shutil

import pytest
import torch

from rosa_ds.adapters.masks import load_masks
from rosa_ds.checkpoint import LATEST, checkpoint_root, tag_for
from rosa_ds.config import SPARSE_LR_RATIO
from tests.helpers import train_ok

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = [
    "--config",
    "tiny-robust",
    "train.max_steps=8",
    "train.lr=1e-2",
    "adapter.robust.mask_warmup_steps=3",
    "adapter.robust.mask_grad_steps=1",
    "eval.num_generate=0",
]


def _run(tmp_path_factory, name, *extra, nproc=1):
    out = tmp_path_factory.mktemp(name) / "run"
    launcher = "ranks" if nproc > 1 else "python"
    summary = train_ok([*COMMON, f"output_dir={out}", *extra], nproc=nproc, launcher=launcher)
    return out, summary


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory, "single", "deepspeed.config=zero2")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return _run(tmp_path_factory, "z2", "deepspeed.config=zero2", "train.save_every=4", nproc=2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _run(tmp_path_factory, "z3", "deepspeed.config=zero3", nproc=2)


def _same_masks(a, b):
    ma, mb = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
    assert ma.keys() == mb.keys() and len(ma) == 14
    for name in ma:
        assert torch.equal(ma[name].flat_indices(), mb[name].flat_indices()), name


@pytest.mark.parametrize("which", ["zero2", "zero3"])
def test_two_ranks_build_the_single_process_mask(which, single, request):
    out, summary = request.getfixturevalue(which)
    _same_masks(out, single[0])
    acc = summary["accumulator_bytes"]
    assert acc["dense"] == single[1]["accumulator_bytes"]["dense"]
    assert single[1]["accumulator_bytes"]["local"] == acc["dense"]
    assert abs(acc["local"] / acc["dense"] - 0.5) < 0.01  # each rank holds half


@pytest.mark.parametrize("which", ["zero2", "zero3"])
def test_restart_trains_to_lower_loss(which, request):
    _, summary = request.getfixturevalue(which)
    assert len(summary["warmup_losses"]) == 4 and len(summary["losses"]) == 8
    assert summary["losses"][-1] < summary["losses"][0] - 0.1
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["mask_nnz"] > 0


def test_zero3_partitions_the_mask_indices(zero2, zero3):
    """Under ZeRO-3 every rank keeps only its partition of the masks' indices (one partition
    per matrix, so at most one entry of padding per matrix); under ZeRO-2 each rank keeps them
    all. Both runs chose the same masks, so the totals are equal."""
    z2, z3 = zero2[1], zero3[1]
    total = z3["mask_index_elements_total"]
    assert total > 0 and total == z2["mask_index_elements_total"]
    assert z2["mask_index_elements_max_rank"] == total
    assert z3["mask_index_elements_max_rank"] <= total / 2 + 14


def test_sparse_add_and_spmm_paths_train_alike_under_zero3(zero3, tmp_path_factory):
    """The tiny runs take the sparse-add path (auto); forcing the separate sparse product
    gives the same losses and the same mask, ZeRO-3 gathering the frozen weight either way."""
    _, auto = zero3
    _, spmm = _run(
        tmp_path_factory, "z3spmm", "deepspeed.config=zero3", "adapter.sparse_path=spmm", nproc=2
    )
    torch.testing.assert_close(
        torch.tensor(spmm["losses"]), torch.tensor(auto["losses"]), rtol=1e-4, atol=1e-5
    )


def test_continue_trains_to_lower_loss(tmp_path_factory):
    _, summary = _run(
        tmp_path_factory,
        "cont",
        "deepspeed.config=zero2",
        "adapter.robust.after_mask=continue",
        nproc=2,
    )
    assert len(summary["warmup_losses"]) == 4 and len(summary["losses"]) == 4
    # one pass: the main pass picks up where the warm-up left off
    assert summary["losses"][-1] < summary["warmup_losses"][0] - 0.1


def test_resume_keeps_the_mask_and_the_losses(zero2, tmp_path):
    src, full = zero2
    out = tmp_path / "run"
    shutil.copytree(src, out)
    root = checkpoint_root(out)
    shutil.rmtree(root / tag_for(8))
    (root / LATEST).write_text(tag_for(4))
    (out / "masks.safetensors").unlink()  # the checkpoint alone must carry the mask
    resumed = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero2", "--resume"],
        nproc=2,
        launcher="ranks",
    )
    assert resumed["resumed_from"] == 4
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-6
    )
    a = load_masks(root / tag_for(8) / "masks.safetensors")
    b = load_masks(src / "masks.safetensors")
    for name in a:
        assert torch.equal(a[name].flat_indices(), b[name].flat_indices())


def test_restart_warmup_longer_than_the_main_pass(tmp_path):
    """after_mask=restart: max_steps counts the main pass alone, and the warm-up pass has a
    schedule of its own length, so its learning rate never falls to the end of a shorter one."""
    import json

    out = tmp_path / "run"
    summary = train_ok(
        [
            *COMMON,
            f"output_dir={out}",
            "train.max_steps=2",
            "train.scheduler=linear",
            "train.warmup_steps=1",
            "adapter.robust.mask_warmup_steps=4",
            "eval.before_training=false",
        ]
    )
    assert len(summary["warmup_losses"]) == 5 and len(summary["losses"]) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm_lrs = [r["lr"] for r in rows if r.get("phase") == "warmup" and "lr" in r]
    # each row's lr is the one the next step uses: steps 2..5 of the warm-up all learn (a
    # schedule of max_steps=2 would give them 0), and the warm-up's schedule ends at its end
    assert len(warm_lrs) == 5 and min(warm_lrs[:4]) > 0 and warm_lrs[4] == 0, warm_lrs


def test_sparse_values_follow_their_own_learning_rate(zero2, tmp_path):
    """adapter.robust.sparse_lr: the sparse values train at their own peak learning rate on the
    shared schedule (2 ranks, ZeRO-2: the rate survives DeepSpeed's partitioned groups); the
    zero2 run, the same but for the rate, trains them at the default 2/7 of train.lr."""
    import json

    from safetensors.torch import load_file

    def read(out):
        state = load_file(str(out / "adapter" / "adapter.safetensors"))
        sparse = max(v.abs().max().item() for k, v in state.items() if k.endswith("sparse_values"))
        lora_b = max(v.abs().max().item() for k, v in state.items() if k.endswith("lora_B"))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return sparse, lora_b, [r for r in rows if r.get("phase") == "train" and "lr" in r]

    own_dir = tmp_path / "own"
    args = [*COMMON, f"output_dir={own_dir}", "deepspeed.config=zero2", "train.save_every=4"]
    train_ok([*args, "adapter.robust.sparse_lr=1e-8"], nproc=2, launcher="ranks")
    shared_sparse, shared_b, shared_rows = read(zero2[0])
    own_sparse, own_b, own_rows = read(own_dir)
    # Adam moves each value by at most about lr per step: 8 steps of at most 1e-8
    assert own_sparse < 1e-6 < shared_sparse, (own_sparse, shared_sparse)
    assert own_b > 1e-3 and shared_b > 1e-3  # LoRA trained at train.lr in both
    assert len(own_rows) == len(shared_rows) == 8
    for shared, own in zip(shared_rows, own_rows, strict=True):
        assert own["lr"] == shared["lr"]
        assert shared["lr_sparse"] == pytest.approx(shared["lr"] * SPARSE_LR_RATIO)
        assert own["lr_sparse"] == pytest.approx(own["lr"] * 1e-8 / 1e-2)
