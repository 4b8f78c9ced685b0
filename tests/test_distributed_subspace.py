"""Subspace adaptation with DeepSpeed, 1 and 2 real ranks, ZeRO-2 and ZeRO-3: the function is
unchanged by a resample, 2 ranks compute what 1 process computes, Adam's state of the factors
is zero afterwards and the learning rate stays on its schedule; a resumed run continues
identically across a resample; the export carries the whole accumulated update."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rosa_ds.checkpoint import LATEST, checkpoint_root, tag_for
from tests.helpers import export_run, merged_eval_loss, run_probe, train_ok

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


# RoSA + ROSA: the resample of the low-rank part, with a sparse part beside it that it must
# leave alone (its mask collected at once, no warm-up)
HYBRID = ["adapter.density=0.05", "adapter.robust.mask_warmup_steps=0"]


def _probe(tmp_path_factory, nproc: int, zero: str) -> dict:
    out = tmp_path_factory.mktemp(f"probe{nproc}{zero}") / "probe.pt"
    args = [str(out), f"deepspeed.config={zero}", *HYBRID]
    proc = run_probe("resample_probe.py", args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict:
    """One resample of a hybrid run in one process and at 2 ranks under ZeRO-2 and ZeRO-3."""
    return {
        (n, z): _probe(tmp_path_factory, n, z)
        for n, z in [(1, "zero2"), (2, "zero2"), (2, "zero3")]
    }


@pytest.mark.parametrize("key", [(1, "zero2"), (2, "zero2"), (2, "zero3")])
def test_resample_preserves_logits_and_resets_optimizer(probes, key):
    d = probes[key]
    assert d["world"] == key[0]
    torch.testing.assert_close(d["after"], d["before"], atol=1e-4, rtol=1e-4)
    assert (d["after_step"] - d["after"]).abs().max() > 1e-3  # and training goes on
    assert d["moment_before"] > 0 and max(d["moments"].values()) == 0.0
    # the learning rate is where the schedule says: cosine after 2 warm-up steps, at step 3
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=20)
    for _ in range(3):
        opt.step()
        sched.step()
    assert d["lr_after"] == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
    assert d["lr_before"] == d["lr_after"]
    # the model copy of each factor matches its fp32 master
    for k, v in d["weights"].items():
        if k.endswith(".a_model"):
            torch.testing.assert_close(v, d["weights"][k[: -len("_model")]])


def test_rewarm_after_resample(tmp_path_factory):
    """With adapter.subspace.rewarm_steps=4 the learning rate restarts at a quarter of the
    schedule's value right after the resample."""
    out = tmp_path_factory.mktemp("rewarm") / "probe.pt"
    proc = run_probe("resample_probe.py", [str(out), "adapter.subspace.rewarm_steps=4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = torch.load(out, weights_only=False)
    assert d["lr_after"] == pytest.approx(d["lr_before"] / 4, rel=1e-9)


@pytest.mark.parametrize("key", [(2, "zero2"), (2, "zero3")])
def test_two_ranks_resample_like_one_process(probes, key):
    one, two = probes[(1, "zero2")], probes[key]
    assert two["indices"] == one["indices"]
    assert set(two["owners"].values()) == {0, 1}  # both ranks own matrices
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", [(1, "zero2"), (2, "zero2"), (2, "zero3")])
def test_hybrid_resample_keeps_the_sparse_part(probes, key):
    """Only the low-rank part is resampled; the sparse values and their Adam state stay as
    they were (they live in a parameter group of their own)."""
    d = probes[key]
    assert d["sparse_before"] and d["sparse_before"].keys() == d["sparse_after"].keys()
    assert sum(float(v.abs().sum()) for v in d["sparse_before"].values()) > 0
    for k, v in d["sparse_before"].items():
        assert torch.equal(v, d["sparse_after"][k])
    assert d["sparse_moments"] > 0 and max(d["moments"].values()) == 0.0


COMMON = [
    "--config",
    "tiny-subspace",
    "train.max_steps=10",
    "adapter.resample_every=3",
    "train.save_every=4",
    "train.keep_checkpoints=3",
    "eval.num_generate=0",
    "train.lr=1e-2",
]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub3") / "run"
    summary = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero3"], nproc=2, launcher="ranks"
    )
    return out, summary


def test_resume_across_a_resample_continues_identically(zero3_run, tmp_path):
    src, full = zero3_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    root = checkpoint_root(out)
    for step in (8, 10):
        shutil.rmtree(root / tag_for(step))
    (root / LATEST).write_text(tag_for(4))
    resumed = train_ok(
        [*COMMON, f"output_dir={out}", "deepspeed.config=zero3", "--resume"],
        nproc=2,
        launcher="ranks",
    )
    assert resumed["resumed_from"] == 4
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-6
    )
    state = json.loads((root / tag_for(10) / "trainer_state.json").read_text())
    assert state["history"]["resample"]["steps"] == [0, 3, 6, 9]


def test_subspace_export_carries_the_accumulated_update(zero3_run, tmp_path):
    out, summary = zero3_run
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "subspace" and meta["resamples"] == 4
    # the update since the start has a rank above r: the subspace moved
    assert max(meta["delta_ranks"].values()) > meta["rank"]
    loss = merged_eval_loss(export_run(out) / "merged", "tiny-subspace", (), tmp_path)
    assert loss == pytest.approx(summary["after"]["eval_loss"], abs=1e-4)


def test_hybrid_run_trains_resamples_and_exports(tmp_path):
    """RoSA + ROSA through the command line: mask warm-up, resampled training, export."""
    out = tmp_path / "run"
    summary = train_ok(
        [
            "--config",
            "tiny-robust",
            f"output_dir={out}",
            "adapter.resample_every=3",
            "train.max_steps=8",
            "adapter.robust.mask_warmup_steps=2",
            "eval.num_generate=0",
            "train.lr=1e-2",
        ],
        nproc=2,
        launcher="ranks",
    )
    assert summary["losses"][-1] < summary["losses"][0] - 0.1
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "hybrid" and meta["sparse_modules"] and meta["resamples"] == 3
    assert "delta_ranks" in meta
    loss = merged_eval_loss(export_run(out) / "merged", "tiny-robust", (), tmp_path / "cfg")
    assert loss == pytest.approx(summary["after"]["eval_loss"], abs=1e-4)
