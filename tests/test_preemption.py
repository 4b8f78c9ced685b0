"""Preemption: a stop signal to any rank makes every rank finish the optimizer step, write a
complete checkpoint and exit with code 75; ``train.auto_resume`` then continues to the
uninterrupted run's losses and final adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_ds.checkpoint import incomplete_checkpoints, latest_checkpoint, read_state
from rosa_ds.preemption import PREEMPTED_EXIT_CODE, StopRequest
from tests.helpers import (
    LORA_REFERENCE,
    REPO,
    child_env,
    launch,
    start_ranks,
    train_ok,
    wait_for_logged_step,
)

# --- units ------------------------------------------------------------------------------------


def test_stop_request_records_the_first_signal_and_ignores_the_second():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(["SIGUSR2"]).install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and stop.signal_name == "SIGUSR2"
        first = stop.received_at
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)  # the process survives and the record stays
        assert stop.received_at == first
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_a_rank_leaving_with_the_preempted_code_survives_a_sigterm_during_teardown():
    """srun ends the other ranks of a step with SIGTERM when the first one exits; a rank still
    finalizing then must exit with 75, not 143 (the interpreter drops Python handlers while it
    finalizes, so the SIGTERM here arrives from an object destroyed at that point)."""
    script = (
        "import os, signal, sys, time\n"
        "from rosa_ds.preemption import StopRequest\n"
        "stop = StopRequest(['SIGUSR1']).install()\n"
        "if sys.argv[1] == 'leave': stop.ignore_from_now()\n"
        "class Late:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "late = Late()\n"
        "sys.exit(75)\n"
    )
    codes = {
        arg: subprocess.run(
            [sys.executable, "-c", script, arg], env=child_env(), timeout=60
        ).returncode
        for arg in ("leave", "keep")
    }
    assert codes == {"leave": PREEMPTED_EXIT_CODE, "keep": -signal.SIGTERM}


def test_a_stop_that_takes_longer_than_the_timeout_exits_with_the_preempted_code():
    script = (
        "import os, signal, time\n"
        "from rosa_ds.preemption import StopRequest\n"
        "StopRequest(['SIGTERM'], timeout=0.5).install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr
    assert time.monotonic() - t0 < 20
    assert "train.stop_timeout=0.5 s" in proc.stderr


# --- end to end -------------------------------------------------------------------------------


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter.safetensors")


def _assert_same_run(resumed: dict, whole: dict, run: Path, whole_dir: Path) -> None:
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5, abs=1e-6)
    a, b = _adapter(run), _adapter(whole_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _stop_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rosa-ds: stopped after step")]


@pytest.mark.slow
def test_sigterm_mid_step_checkpoints_that_step_and_auto_resume_continues(tmp_path, reference_run):
    """SIGTERM arrives during step 3 (after its first micro-batch): the step completes, the
    step-3 checkpoint is written, the exit code is 75; auto_resume ends where the uninterrupted
    run ends."""
    whole_dir, whole = reference_run("zero2", 1)
    args = [*LORA_REFERENCE, "deepspeed.config=zero2", f"output_dir={tmp_path / 'run'}"]
    proc = launch(["train", *args], env=child_env(ROSA_DS_FAULT="signal:rank0@3"))
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(_stop_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    print(_stop_lines(proc.stderr)[0])
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-000003"
    assert read_state(latest)["step"] == 3
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = train_ok([*args, "train.auto_resume=true"])
    assert resumed["resumed_from"] == 3
    _assert_same_run(resumed, whole, tmp_path / "run", whole_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step_and_resume_matches(
    tmp_path, reference_run
):
    """Only rank 1 receives SIGTERM (from outside, while it trains): both ranks write the same
    checkpoint and exit with 75; a resume (2 ranks) ends with the uninterrupted 2-rank
    run's losses and adapter."""
    whole_dir, whole = reference_run("zero2", 2)
    out = tmp_path / "run"
    args = [*LORA_REFERENCE, "deepspeed.config=zero2", f"output_dir={out}"]
    cmd = [sys.executable, "-m", "rosa_ds.cli", "train", *args]
    procs = start_ranks(cmd, ROSA_DS_FAULT="slow@1-8")
    wait_for_logged_step(out, 2, procs)
    sent = time.monotonic()
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in procs]
    took = time.monotonic() - sent
    print(f"2 ranks exited {took:.1f} s after SIGTERM to rank 1")
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert len(_stop_lines(outputs[0][1])) == 1  # rank 0 reports, though rank 1 got the signal
    assert "a stop signal reached another rank" in outputs[0][1]
    assert took < 25  # train.stop_timeout's default: the stop is well inside it here
    latest = latest_checkpoint(out)
    stopped = read_state(latest)["step"]
    assert 2 <= stopped < 8 and not incomplete_checkpoints(out)
    resumed = train_ok([*args, "train.auto_resume=true"], nproc=2, launcher="ranks")
    assert resumed["resumed_from"] == stopped
    _assert_same_run(resumed, whole, out, whole_dir)


@pytest.mark.slow
def test_a_signal_during_mask_collection_stops_at_the_start_of_the_main_pass(tmp_path):
    """The collection step cannot be checkpointed half-way: a signal there stops the run at the
    next save point (the main pass's first state, masks chosen), and the resumed run ends with
    the uninterrupted run's adapter."""
    base = [
        "--config",
        "tiny-robust",
        "train.max_steps=4",
        "adapter.robust.mask_warmup_steps=2",
        "adapter.robust.mask_grad_steps=2",
        "eval.num_generate=0",
    ]
    whole = train_ok([*base, f"output_dir={tmp_path / 'whole'}"])
    out = tmp_path / "run"
    proc = launch(
        ["train", *base, f"output_dir={out}"], env=child_env(ROSA_DS_FAULT="signal:rank0@3")
    )
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    state = read_state(latest_checkpoint(out))
    assert (state["phase"], state["step"]) == ("train", 0)  # after collection, masks chosen
    assert (latest_checkpoint(out) / "masks.safetensors").is_file()
    resumed = train_ok([*base, f"output_dir={out}", "train.auto_resume=true"])
    _assert_same_run(resumed, whole, out, tmp_path / "whole")


def test_auto_resume_without_a_checkpoint_starts_a_new_run(tmp_path):
    from rosa_ds.config import load_config
    from rosa_ds.preflight import auto_resume

    cfg = load_config("tiny-lora", [f"output_dir={tmp_path}", "train.auto_resume=true"])
    assert auto_resume(cfg, None) is None
    ckpt = tmp_path / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4}))
    assert auto_resume(cfg, None) == ""  # output_dir's latest
    assert auto_resume(cfg, "elsewhere") == "elsewhere"  # --resume DIR wins
    off = load_config("tiny-lora", [f"output_dir={tmp_path}"])
    assert auto_resume(off, None) is None


def test_templates_ask_for_a_warning_signal_requeue_and_auto_resume():
    for name in ("single_node_deepspeed.sbatch", "multi_node_srun.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert "#SBATCH --requeue" in text, name
        assert "--signal=" in text and "train.auto_resume=true" in text, name
        assert 'source "$ROSA_DS_HOME/slurm/requeue.sh"' in text, name
    requeue = (REPO / "slurm" / "requeue.sh").read_text()
    assert "scontrol requeue" in requeue and f'"$code" -eq {PREEMPTED_EXIT_CODE}' in requeue
