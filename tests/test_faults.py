"""Faults a long run meets: a rank killed mid-training, NaN losses and gradients, leftovers of
interrupted writes. Each must end in a clear error or a skipped step, never a hang or lost work."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_ds import faults
from rosa_ds.errors import TrainingError
from rosa_ds.numerics import NonFiniteGuard, nonfinite_trainable
from tests.helpers import (
    LORA_REFERENCE,
    REPO,
    RunProcess,
    child_env,
    launch,
    start_ranks,
    train_ok,
)

RUN = [
    "--config",
    "tiny-lora",
    "train.max_steps=8",
    "train.save_every=2",
    "train.keep_checkpoints=4",
    "eval.num_generate=0",
]


# --- units ------------------------------------------------------------------------------------


def test_fault_spec_parses_items_and_ranges(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "nan_grad@3-5, kill:rank1@7,save:engine@8")
    assert [faults.active("nan_grad", s) for s in (2, 3, 5, 6)] == [False, True, True, False]
    assert faults.active("kill:rank1", 7) and not faults.active("kill:rank0", 7)
    assert faults.active("save:engine", 8) and not faults.active("nan_loss", 3)
    monkeypatch.delenv(faults.FAULT_ENV)
    assert not faults.active("nan_grad", 3)


def test_guard_skips_then_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard(max_bad_steps=2)
    assert guard.check(1, 1.0, applied=True) is False
    assert guard.check(2, math.nan, applied=False) is True
    assert guard.check(3, 1.0, applied=True) is False  # a good step resets the count
    assert guard.check(4, 1.0, applied=False) is True  # finite loss, gradient skipped
    assert guard.check(5, math.inf, applied=True) is True
    with pytest.raises(TrainingError, match="3 optimizer step"):
        guard.check(6, math.nan, applied=False)
    assert guard.skipped == [2, 4, 5, 6]


def test_nonfinite_trainable_counts_only_trainable_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # frozen: not counted
    assert nonfinite_trainable(model) == 0
    with torch.no_grad():
        model[1].bias[1] = math.inf
    assert nonfinite_trainable(model) == 1


def test_nonfinite_trainable_ignores_zero3_partition_padding(monkeypatch):
    """The last rank's ZeRO-3 partition is padded with memory DeepSpeed never writes: NaN
    there is not the adapter's (it stopped forked 2-rank ZeRO-3 runs at their first save)."""
    from rosa_ds import zero_params

    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 3  # partitions of 2 over 2 ranks: rank 1 holds element 2 and one pad
    monkeypatch.setattr(zero_params, "rank_world", lambda: (1, 2))
    p.ds_tensor = torch.tensor([1.0, math.nan])
    assert nonfinite_trainable(torch.nn.ParameterList([p])) == 0
    p.ds_tensor = torch.tensor([math.nan, 0.0])
    assert nonfinite_trainable(torch.nn.ParameterList([p])) == 1


# --- numerical trouble, end to end -----------------------------------------------------------


def _checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every adapter tensor and DeepSpeed module tensor written under the run's folder."""
    tensors = {}
    for f in out.rglob("*.safetensors"):
        tensors.update({f"{f}:{k}": v for k, v in load_file(f).items()})
    for f in out.rglob("*model_states.pt"):
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        tensors.update({f"{f}:{k}": v for k, v in module.items()})
    return tensors


def _assert_no_nan(out: Path) -> None:
    tensors = _checkpoint_tensors(out)
    assert tensors, f"nothing written under {out}"
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, bad


@pytest.mark.slow
def test_nan_loss_and_nan_gradient_steps_are_skipped(tmp_path):
    """A NaN loss (step 3) and a NaN gradient (step 5) each skip their step; training goes on
    and every checkpoint is finite."""
    out = tmp_path / "run"
    proc = launch(
        ["train", *RUN, f"output_dir={out}"],
        env=child_env(ROSA_DS_FAULT="nan_loss@3,nan_grad@5"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == [3, 5]
    losses = summary["losses"]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert losses[-1] < losses[0]
    assert "step 5: non-finite loss or gradient, step skipped" in proc.stderr
    _assert_no_nan(out)


@pytest.mark.slow
def test_skipped_step_changes_no_weight(tmp_path):
    """With a constant learning rate, 3 steps whose third is skipped leave the adapter exactly
    where 2 clean steps leave it."""
    const = ["train.scheduler=constant", "train.warmup_steps=0", "train.save_every=0"]
    base = [a for a in RUN if not a.startswith(("train.max_steps", "train.save_every"))]
    two = train_ok([*base, *const, "train.max_steps=2", f"output_dir={tmp_path / 'two'}"])
    three_dir = tmp_path / "three"
    proc = launch(
        ["train", *base, *const, "train.max_steps=3", f"output_dir={three_dir}"],
        env=child_env(ROSA_DS_FAULT="nan_grad@3"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(Path(two["adapter"]) / "adapter.safetensors")
    b = load_file(three_dir / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.slow
def test_too_many_bad_steps_stop_the_run_and_no_checkpoint_holds_nan(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        ["train", *RUN, "train.max_bad_steps=2", "train.save_every=1", f"output_dir={out}"],
        env=child_env(ROSA_DS_FAULT="nan_grad@3-8"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rosa-ds: error:")]
    assert len(errors) == 1 and "3 optimizer step(s) in a row" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert names[-1] == "step-000004"  # steps 3 and 4 were skipped and saved, step 5 stopped it
    _assert_no_nan(out)


# --- a rank dies ------------------------------------------------------------------------------


def _start_ranks(out: Path, fault: str, timeout: float, args: list[str]) -> list[RunProcess]:
    """Two ranks as plain processes: no launcher that would kill the survivor for us."""
    cmd = [sys.executable, "-m", "rosa_ds.cli", "train", *args, f"output_dir={out}"]
    cmd.append(f"deepspeed.heartbeat_timeout={timeout}")
    return start_ranks(cmd, ROSA_DS_FAULT=fault)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("lost", "resume"), [(1, True), (0, False)])
def test_killed_rank_stops_the_other_and_resume_matches(lost, resume, tmp_path, reference_run):
    """SIGKILL one of 2 ranks after step 5: the survivor exits non-zero within the heartbeat
    timeout (5 s here, 30 by default) plus 30 s, naming the lost rank, and (checked once, the
    same after either loss) a resume from the step-4 checkpoint ends with the losses of the
    uninterrupted run."""
    _, whole = reference_run("zero2", 2)
    args = [*LORA_REFERENCE, "deepspeed.config=zero2"]
    out = tmp_path / "run"
    timeout = 5
    procs = _start_ranks(out, f"kill:rank{lost}@5", timeout, args)
    survivor = procs[1 - lost]
    procs[lost].communicate(timeout=600)
    assert procs[lost].returncode == -9
    died = time.monotonic()
    _, err = survivor.communicate(timeout=120)
    waited = time.monotonic() - died
    print(f"rank {1 - lost} exited {waited:.1f} s after rank {lost} was killed")
    assert survivor.returncode not in (0, None), err[-2000:]
    assert waited < timeout + 30, waited
    message = [line for line in err.splitlines() if line.startswith("rosa-ds: error:")]
    assert message and f"rank {lost}" in message[-1], err[-2000:]
    assert "--resume" in message[-1]
    if not resume:
        return
    resumed = train_ok([*args, f"output_dir={out}", "--resume"], nproc=2, launcher="ranks")
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5, abs=1e-6)


# --- leftovers of interrupted writes ---------------------------------------------------------


def test_adapter_write_survives_a_leftover_of_a_crashed_write(tmp_path):
    from rosa_ds.adapters.io import _atomic_dir_write

    target = tmp_path / "adapter"
    (tmp_path / ".adapter.old").mkdir()  # left by a crash between the two renames
    (tmp_path / ".adapter.old" / "junk").write_text("x")
    for text in ("first", "second"):
        _atomic_dir_write(target, lambda d, t=text: (d / "f.txt").write_text(t))
    assert (target / "f.txt").read_text() == "second"
    assert not (tmp_path / ".adapter.old").exists()


def test_interrupted_checkpoint_leftovers_are_listed_but_other_folders_are_not(tmp_path):
    from rosa_ds.checkpoint import checkpoint_root, incomplete_checkpoints, latest_checkpoint

    root = checkpoint_root(tmp_path)
    for name in ("step-000002", ".step-000004.old", "step-000006.tmp", "my-notes"):
        (root / name).mkdir(parents=True)
    (root / "step-000002" / "trainer_state.json").write_text("{}")
    (root / ".step-000004.old" / "trainer_state.json").write_text("{}")
    left = [p.name for p in incomplete_checkpoints(tmp_path)]
    assert left == [".step-000004.old", "step-000006.tmp"]
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert os.path.isdir(root / "my-notes")


# --- an SVD that does not converge ------------------------------------------------------------


def test_svd_falls_back_to_fp64_and_says_so(monkeypatch, capsys):
    from rosa_ds.adapters import svd as svd_module

    real = torch.linalg.svd
    calls = []

    def flaky(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    m = torch.randn(12, 7)
    u, s, vh = svd_module.robust_svd(m, "merged weight")
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close((u * s) @ vh, m, rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "fell back to fp64 on the CPU" in err and "failed to converge" in err


def test_svd_of_a_diverged_matrix_is_a_clear_error():
    from rosa_ds.adapters.svd import robust_svd

    m = torch.randn(4, 4)
    m[1, 2] = math.nan
    with pytest.raises(TrainingError, match="holds NaN or Inf"):
        robust_svd(m)


# --- room for a checkpoint ---------------------------------------------------------------------


def test_output_dir_without_room_for_a_checkpoint_is_refused(monkeypatch, tmp_path):
    import shutil

    from rosa_ds.config import load_config
    from rosa_ds.errors import UserError
    from rosa_ds.model import check_model
    from rosa_ds.preflight import check_adapters

    cfg = load_config("tiny-lora", [f"output_dir={tmp_path / 'run'}"])
    hf_config = check_model(cfg.model)[1]
    check_adapters(cfg, hf_config, training=True)  # plenty of room here
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(UserError, match="GiB free but one checkpoint needs"):
        check_adapters(cfg, hf_config, training=True)
    check_adapters(cfg, hf_config, training=False)  # evaluation writes no checkpoint


# --- safe loading -----------------------------------------------------------------------------


class Payload:
    """Stands for any object a tampered checkpoint could smuggle in."""


def test_every_torch_load_in_the_package_is_weights_only():
    import re

    calls = []
    for path in [*(REPO / "rosa_ds").rglob("*.py"), *(REPO / "launcher").rglob("*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            end = text.index(")\n", match.end())
            calls.append((path.name, text[match.end() : end]))
    assert calls  # the pattern still finds the calls
    unsafe = [(name, args) for name, args in calls if "weights_only=True" not in args]
    assert not unsafe, unsafe


def test_deepspeed_checkpoint_reader_refuses_foreign_objects(tmp_path):
    from rosa_ds.errors import UserError
    from rosa_ds.reshard import _load

    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(_load(tmp_path / "plain.pt")["weights"], torch.ones(2))
    torch.save({"weights": torch.ones(2), "extra": Payload()}, tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        _load(tmp_path / "tampered.pt")
