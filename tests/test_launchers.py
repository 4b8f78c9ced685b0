"""Launch paths that tests/test_distributed.py does not cover: rank discovery details (SLURM
steps, MVAPICH2, node lists), MPI discovery through mpi4py when the launcher exports no rank
variables (with a real mpirun, and a full `tiny-lora` run that way), the MPI rendezvous, and the
DeepSpeed hostfile written from a SLURM allocation. (torchrun, the deepspeed launcher and mpirun
with its usual variables each run `tiny-lora` in tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launcher.hostfile import expand_tasks_per_node, hostfile_text
from launcher.hostfile import main as hostfile_main
from rosa_ds.dist import (
    Placement,
    detect_placement,
    expand_nodelist,
    prepare_environment,
    slurm_master_port,
)
from rosa_ds.errors import UserError
from tests.helpers import BIN, REPO, child_env

MPIRUN = BIN / "mpirun"
needs_mpirun = pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun in the environment")


# --- discovery from variables ------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        # srun step: the step's task count wins over the job's
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_NTASKS": "8",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_ID": "2",
            },
            Placement(3, 4, 1, "slurm"),
        ),
        # a one-task step is one process
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"},
            Placement(0, 1, 0, "single"),
        ),
        # the deepspeed launcher inside an sbatch script: its variables win over SLURM's
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0"},
            Placement(1, 2, 1, "torch"),
        ),
        (
            {
                "MV2_COMM_WORLD_RANK": "2",
                "MV2_COMM_WORLD_SIZE": "4",
                "MV2_COMM_WORLD_LOCAL_RANK": "0",
            },
            Placement(2, 4, 0, "mpi"),
        ),
        # hints of an MPI launch are only followed up (through mpi4py) for the real environment
        ({"PMI_FD": "9"}, Placement(0, 1, 0, "single")),
    ],
)
def test_detect_placement_more_launchers(env, expected):
    assert detect_placement(env) == expected


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a[8-10],b", ["a8", "a9", "a10", "b"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_environment_is_filled_from_the_node_list(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that undo removes what the test sets
        monkeypatch.delenv(key)
    env = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_STEP_NODELIST": "gpu[08-09]",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")  # no scontrol config here
    monkeypatch.setattr("rosa_ds.dist.slurm_hostnames", expand_nodelist)
    placement = detect_placement()
    assert placement == Placement(5, 8, 1, "slurm")
    prepare_environment(placement)
    assert os.environ["MASTER_ADDR"] == "gpu08"  # the step's first node: task 0 runs there
    assert os.environ["MASTER_PORT"] == str(slurm_master_port(env))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "5",
        "8",
        "1",
    )
    # another step of the same job gets another port
    assert slurm_master_port({**env, "SLURM_STEP_ID": "1"}) != slurm_master_port(env)


# --- MPI through mpi4py -------------------------------------------------------------------------

PROBE = """
import json, os, sys
import rosa_ds.dist as d
if sys.argv[1] == "hide":
    d.MPI_VARS = ()  # as under an MPI whose launcher exports none of the known variables
p = d.detect_placement()
d.prepare_environment(p)
row = [p.rank, p.world_size, p.local_rank, p.launcher,
       os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]]
with open(os.path.join(sys.argv[2], f"rank{p.rank}.json"), "w") as f:
    json.dump(row, f)
"""


@needs_mpirun
@pytest.mark.parametrize("mode", ["vars", "hide"])
def test_mpirun_rendezvous(mode, tmp_path):
    """Under mpirun, with or without the rank variables: rank/size from MPI, and one master
    address and free port agreed by all ranks (not DeepSpeed's fixed 29500)."""
    proc = subprocess.run(
        [str(MPIRUN), "-n", "2", sys.executable, "-c", PROBE, mode, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r[:4] for r in rows] == [[0, 2, 0, "mpi"], [1, 2, 1, "mpi"]]
    assert rows[0][4:6] == rows[1][4:6] and rows[0][4] == "127.0.0.1"
    assert [r[6] for r in rows] == ["0", "1"]


# --- DeepSpeed hostfile from SLURM ---------------------------------------------------------------


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


@pytest.mark.parametrize(
    "env, slots, text",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, None, "n01 slots=4\nn02 slots=4\n"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, None, "n01 slots=8\nn02 slots=8\n"),
        ({"SLURM_NTASKS_PER_NODE": "2"}, None, "n01 slots=2\nn02 slots=2\n"),
        ({"SLURM_TASKS_PER_NODE": "3,1"}, None, "n01 slots=3\nn02 slots=1\n"),
        ({"SLURM_GPUS_ON_NODE": "4"}, 2, "n01 slots=2\nn02 slots=2\n"),
    ],
)
def test_hostfile_text(monkeypatch, env, slots, text):
    monkeypatch.setattr("launcher.hostfile.slurm_hostnames", expand_nodelist)
    assert hostfile_text({"SLURM_JOB_NODELIST": "n[01-02]", **env}, slots=slots) == text


def test_hostfile_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("launcher.hostfile.slurm_hostnames", expand_nodelist)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert hostfile_main([]) == UserError.exit_code  # not in an allocation
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    assert hostfile_main([]) == UserError.exit_code  # no slots anywhere
    assert "--slots" in capsys.readouterr().err
    out = tmp_path / "hostfile"
    assert hostfile_main(["--slots", "4", "-o", str(out)]) == 0
    assert out.read_text() == "n1 slots=4\nn2 slots=4\n"


def test_slurm_environment_test_leaves_no_rank_variables():
    """Runs after the test above (same file, same pytest worker), which fills RANK, WORLD_SIZE,
    ... in this process: they must be gone, or a later in-process run on this worker would take
    itself for rank 5 of 8."""
    assert os.environ.get("WORLD_SIZE") != "8" and os.environ.get("RANK") != "5"


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its checks")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and proc.stdout.splitlines()[-1] == "gpu_check=skipped"


@pytest.mark.slow
def test_gpu_check_dry_run_reports_its_figures(tmp_path):
    """The same pipeline on the tiny model and the CPU (LoRA and RoSA: the summary parsing is
    the same for every method): their figures in the last line, none failed."""
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env=child_env(OUT=str(tmp_path), GPU_CHECK_METHODS="lora rosa"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("gpu_check=done") and "FAIL" not in last, proc.stdout[-3000:]
    for name in ("lora", "rosa"):
        assert f"{name}_tok_s=" in last and f"{name}_mem_vs_plan=" in last, last
