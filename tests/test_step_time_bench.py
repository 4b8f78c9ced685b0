"""The benchmarks' command lines: a RoSA split outside the budget (``step_time.py``) or a rank
below 1 (``low_rank.py``) is refused before anything is timed or launched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize("rosa_rank", ["16", "-1"])
def test_a_rosa_rank_outside_the_budget_is_a_one_line_usage_error(rosa_rank):
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--vs", "lora"]
    r = subprocess.run(
        [*cmd, "--rank", "16", "--rosa-rank", rosa_rank], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("step_time.py: error: --rosa-rank must")
    assert "Traceback" not in r.stderr


def test_an_a_a_control_without_vs_lora_is_a_one_line_usage_error():
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--control"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith("--control is an A/A run of --vs lora; add --vs lora")
    )


@pytest.mark.parametrize("args", [["--ranks", "8", "0"], ["--tokens", "0"]])
def test_low_rank_refuses_a_size_below_one_in_one_line(args):
    cmd = [sys.executable, str(REPO / "benchmarks" / "low_rank.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("low_rank.py: error: --")
    assert "must" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # nothing timed
