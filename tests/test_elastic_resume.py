"""Elastic resume: a checkpoint written by 2 ranks resumes on 1 and the reverse, with the next
losses of the uninterrupted run (optimizer state included), under ZeRO-2 and ZeRO-3 (and from a
ZeRO-2 checkpoint into ZeRO-3); the robust adapters' masks and subspace adaptation's rewritten
frozen weights (both in one RoSA + ROSA run) survive it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_ds.adapters.subspace_io import frozen_files, load_frozen_tensors
from rosa_ds.checkpoint import LATEST, MASK_FILE, checkpoint_root, tag_for
from tests.helpers import LORA_REFERENCE, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, CUT = 8, 4  # LORA_REFERENCE's train.max_steps and train.save_every


def _args(config: str, out: Path, zero: str, *extra: str) -> list[str]:
    """The shared reference run's settings (8 steps, checkpoints every 4) for any config."""
    return [
        "train",
        "--config",
        config,
        *LORA_REFERENCE[2:],
        f"output_dir={out}",
        f"deepspeed.config={zero}",
        *extra,
    ]


def _train(args: list[str], nproc: int) -> tuple[dict, str]:
    proc = launch(args, nproc=nproc, launcher="ranks" if nproc > 1 else "python")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    return json.loads((out / "summary.json").read_text()), proc.stderr


def _cut_back(src: Path, dst: Path) -> Path:
    """A copy of a finished run as it was when its step-CUT checkpoint had just been written."""
    shutil.copytree(src, dst)
    root = checkpoint_root(dst)
    for later in range(CUT + 1, STEPS + 1):
        shutil.rmtree(root / tag_for(later), ignore_errors=True)
    (root / LATEST).write_text(tag_for(CUT))
    (dst / "summary.json").unlink()
    return root / tag_for(CUT)


def _elastic(
    tmp_path: Path,
    config: str,
    zero: str,
    saved: int,
    ranks: int,
    resume_zero: str | None = None,
    reference_run=None,
    extra: tuple[str, ...] = (),
) -> tuple:
    """Uninterrupted run on ``saved`` ranks (for tiny-lora the session's shared one), then the
    same run cut at step CUT and resumed on ``ranks`` ranks (with ``resume_zero``, another
    DeepSpeed config), ``extra`` overrides for both; returns (full summary, resumed summary, full dir, resumed dir)."""
    if reference_run is not None:
        full_dir, full = reference_run(zero, saved)
    else:
        full_dir = tmp_path / "full"
        full, _ = _train(_args(config, full_dir, zero, *extra), saved)
    res_dir = tmp_path / "resumed"
    _cut_back(full_dir, res_dir)
    resumed, err = _train([*_args(config, res_dir, resume_zero or zero, *extra), "--resume"], ranks)
    assert f"written by {saved} rank(s)" in err and f"on {ranks} rank(s)" in err, err[-3000:]
    assert "optimizer state re-sharded" in err
    assert resumed["resumed_from"] == CUT and resumed["world_size"] == ranks
    assert len(resumed["losses"]) == STEPS
    # the first loss after the resume and every later one equal the uninterrupted run's
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-6
    )
    a = load_file(str(res_dir / "adapter" / "adapter.safetensors"))
    b = load_file(str(full_dir / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("delta_A"):  # subspace: the update since the start, refactorized
            bk = key.replace("delta_A", "delta_B")
            pa, pb = a[bk] @ a[key], b[bk] @ b[key]
            # W_fixed + s B A - W_0 cancels large numbers: 1 and 2 uninterrupted ranks differ
            # by about 0.2% here too
            assert (pa - pb).norm() <= 1e-2 * pb.norm(), key
        elif not key.endswith("delta_B"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    return full, resumed, full_dir, res_dir


@pytest.mark.parametrize(
    "zero, saved, resumed",
    [("zero2", 2, 1), ("zero2", 1, 2), ("zero3", 2, 1), ("zero3", 1, 2)],
)
def test_lora_resumes_at_another_world_size(tmp_path, zero, saved, resumed, reference_run):
    _elastic(tmp_path, "tiny-lora", zero, saved, resumed, reference_run=reference_run)


# RoSA + ROSA in one run: masks (sparse values of odd sizes, so ZeRO-3 shards are padded) and
# rewritten frozen weights (a resample at the start, and again at step 5, after the resume)
HYBRID = ("adapter.density=0.05", "adapter.robust.mask_warmup_steps=2")


@pytest.mark.parametrize(
    "zero, saved, ranks, resume_zero",
    [("zero3", 2, 1, None), ("zero2", 1, 2, "zero3")],
    ids=["zero3-2-1", "zero2-1-to-zero3-2"],
)
def test_masks_and_frozen_weights_survive(tmp_path, zero, saved, ranks, resume_zero):
    """The masks read from 2 ranks, or written onto 2 from a ZeRO-2 checkpoint of 1, are the
    uninterrupted run's; so are the frozen weights the resumed run rewrites after the resume,
    written as one shard per rank and read at the other size."""
    _, resumed, full_dir, res_dir = _elastic(
        tmp_path, "tiny-subspace", zero, saved, ranks, resume_zero, extra=HYBRID
    )
    assert resumed["mask_nnz"] > 0 and resumed["resamples"] >= 2
    for folder in (full_dir, res_dir):
        assert (checkpoint_root(folder) / tag_for(STEPS) / MASK_FILE).is_file()
    a = load_file(str(checkpoint_root(res_dir) / tag_for(STEPS) / MASK_FILE))
    b = load_file(str(checkpoint_root(full_dir) / tag_for(STEPS) / MASK_FILE))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(frozen_files(checkpoint_root(full_dir) / tag_for(CUT))) == saved  # a shard each
    assert len(frozen_files(checkpoint_root(res_dir) / tag_for(STEPS))) == ranks
    a = load_frozen_tensors(checkpoint_root(res_dir) / tag_for(STEPS))
    b = load_frozen_tensors(checkpoint_root(full_dir) / tag_for(STEPS))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    if saved == 2:
        _assert_each_rank_wrote_its_share(checkpoint_root(full_dir) / tag_for(CUT))


def _assert_each_rank_wrote_its_share(checkpoint: Path) -> None:
    """ZeRO-3 partitions the frozen weights: each of 2 ranks writes its own share of the
    rewritten matrices (disjoint, together every adapted matrix, each about half the bytes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.config import load_config
    from rosa_ds.model import resolve_model_path

    shards = frozen_files(checkpoint)
    assert [p.name for p in shards] == [
        "frozen-00000-of-00002.safetensors",
        "frozen-00001-of-00002.safetensors",
    ]
    keys = [set(load_file(str(p))) for p in shards]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    cfg = load_config("tiny-subspace")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_model_path(cfg.model))
        )
        inject_adapters(model, cfg.adapter)
    assert keys[0] | keys[1] == set(adapted_modules(model))
    sizes = [p.stat().st_size for p in shards]
    largest = max(t.numel() * t.element_size() for t in load_frozen_tensors(checkpoint).values())
    assert max(sizes) <= sum(sizes) / 2 + largest + 4096  # + one matrix and the file header
    print(f"frozen-weight bytes per rank at 2 ranks: {sizes} (one file of {sum(sizes)} before)")
