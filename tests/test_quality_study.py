"""The equal-budget study's plumbing (benchmarks/quality.py): how many resamples a ROSA cell
gets, and that an ablation's ``--set`` overrides reach the run over the cell's own keys."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location(
        "quality_study", REPO / "benchmarks" / "quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _args(**kw):
    base = dict(
        steps=64, resamples=2, lrs=[2e-3], full_lrs=[1e-4], subspace_lrs=[1e-3], small_rank=4,
        large_rank=16,
        small_only=True, sparse_lr_ratio=2 / 7, difficulty=3, num_train=100, max_length=64,
        batch=4, precision="fp32", mask_warmup=8, max_new_tokens=8, val=4, test=4, set=[],
    )  # fmt: skip
    return SimpleNamespace(**(base | kw))


def _every(quality, args) -> int:
    (cell,) = [c for c in quality.cells([(64, 64)], args) if c.method == "subspace"]
    (value,) = [o.split("=")[1] for o in cell.overrides if o.startswith("adapter.resample_every=")]
    return int(value)


@pytest.mark.parametrize(("steps", "resamples"), [(64, 2), (64, 0), (60, 2), (10, 3), (7, 1)])
def test_resamples_n_gives_n_resamples_before_the_end(quality, steps, resamples):
    args = _args(steps=steps, resamples=resamples)
    quality.check_resamples(args)  # a count that fits is not refused
    every = _every(quality, args)
    # the trainer resamples after step k when k % every == 0 and k < steps
    assert sum(1 for k in range(1, steps) if k % every == 0) == resamples


def test_set_overrides_win_over_the_cells_own_keys(quality, monkeypatch, tmp_path):
    from rosa_ds.config import load_config

    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"after": {}}))

    monkeypatch.setattr(quality, "run_logged", fake_run)
    args = _args(set=["adapter.resample_every=5", "adapter.subspace.sampling=bottom"])
    (cell,) = [c for c in quality.cells([(64, 64)], args) if c.method == "subspace"]
    quality.train_cell(cell, 2e-3, 0, args, tmp_path)
    overrides = [a for a in commands[0] if "=" in a and not a.startswith("output_dir=")]
    cfg = load_config("tiny-lora", overrides)
    assert cfg.adapter.resample_every == 5  # the cell's own value was 22
    assert cfg.adapter.subspace.sampling == "bottom"


def test_resamples_that_do_not_fit_the_steps_are_a_clear_error(quality, capsys):
    with pytest.raises(SystemExit) as stop:
        quality.check_resamples(_args(steps=64, resamples=20))  # every 4 steps would give 15
    assert stop.value.code == 2
    assert "--resamples 20 does not fit 64 steps" in capsys.readouterr().err


def test_rosa_cells_sweep_their_own_learning_rates(quality):
    """ROSA's factors start carrying part of W and want lower rates than LoRA's: its cells take
    ``--subspace-lrs``, every other low-rank or sparse cell ``--lrs``, full fine-tuning
    ``--full-lrs``."""
    args = _args(lrs=[2e-3, 5e-3], subspace_lrs=[2.5e-4, 1e-3], full_lrs=[1e-4], small_only=False)
    grids = {c.name: c.lrs for c in quality.cells([(64, 64)], args)}
    assert grids["subspace-r4"] == grids["subspace-r16"] == [2.5e-4, 1e-3]
    assert grids["lora-r4"] == grids["rosa-r2-small"] == grids["hybrid-r8-large"] == [2e-3, 5e-3]
    assert grids["full"] == [1e-4]
