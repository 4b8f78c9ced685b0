"""The test harness's forked runs (tests/zygote.py) behave as new interpreters: same output,
exit codes and signals, and an import-time setting never reaches a forked run."""

from __future__ import annotations

import signal

from tests.helpers import CLI, child_env, launch, start_run


def test_a_forked_run_prints_what_a_new_interpreter_prints(monkeypatch):
    args = ["plan", "--config", "tiny-robust", "--json"]
    forked = start_run([*CLI, *args])
    assert forked._popen is None, "the run was not forked: the suite would pay every import"
    forked_out, _ = forked.communicate(timeout=120)
    monkeypatch.setenv("ROSA_DS_FORK_RUNS", "0")
    fresh = start_run([*CLI, *args])
    assert fresh._popen is not None
    fresh_out, _ = fresh.communicate(timeout=300)
    assert forked.returncode == fresh.returncode == 0
    assert forked_out == fresh_out and forked_out.strip().startswith("{")


def test_a_forked_runs_bad_config_is_one_line_and_exit_2():
    proc = launch(["train", "--config", "tiny-lora", "train.max_steps=abc"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rosa-ds: error: train.max_steps must be an integer, got 'abc'"
    ]


def test_a_signal_ends_a_forked_run_as_it_ends_a_process(tmp_path):
    run = start_run([*CLI, "train", "--config", "tiny-lora", f"output_dir={tmp_path / 'run'}"])
    run.kill()
    assert run.wait(timeout=60) == -signal.SIGKILL


def test_an_import_time_setting_gets_a_new_interpreter():
    run = start_run([*CLI, "env", "--json"], env=child_env(ATEN_CPU_CAPABILITY="avx2"))
    assert run._popen is not None
    assert run.wait(timeout=300) == 0
