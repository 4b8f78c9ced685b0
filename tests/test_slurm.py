"""The project's own sbatch templates on a real one-node SLURM cluster (slurm-wlm + munge on
loopback, started and stopped by tests/slurm_cluster.py): 2 ranks of `tiny-lora` through srun,
and through the deepspeed launcher inside one task, each stopped by its warning signal, requeued
and finished. Skipped, with the reason, where no cluster
can be started (SLURM not installed, not root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa_ds.checkpoint import checkpoint_root, latest_checkpoint, tag_for
from tests.helpers import REPO, child_env, wait_for_logged_step
from tests.slurm_cluster import ClusterError, LocalSlurm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
TRAIN_ARGS = [f"train.max_steps={STEPS}", "train.save_every=3", "eval.num_generate=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = LocalSlurm.unavailable()
    if reason:
        pytest.skip(reason)
    try:
        c = LocalSlurm.start(tmp_path_factory.mktemp("slurm"), cpus=2)
    except (ClusterError, OSError) as exc:
        pytest.skip(f"local SLURM cluster did not start: {str(exc)[:1500]}")
    yield c
    c.stop()


def _job_env() -> dict[str, str]:
    """The submitting shell's environment (sbatch exports it): the project's Python, the
    repository, the config; OMP_NUM_THREADS is left to the template."""
    env = child_env(ROSA_DS_PYTHON=sys.executable, ROSA_DS_HOME=str(REPO), CONFIG="tiny-lora")
    env.pop("OMP_NUM_THREADS", None)
    return env


def test_hostfile_inside_an_allocation(cluster, tmp_path):
    """python -m launcher.hostfile in a 2-task job: the node, 2 slots (SLURM_TASKS_PER_NODE)."""
    log = tmp_path / "hostfile-%j.out"
    job = cluster.sbatch(
        ["--ntasks=2", f"--output={log}", "--wrap", f"{sys.executable} -m launcher.hostfile"],
        env=_job_env(),
        cwd=REPO,
    )
    info = cluster.wait(job, timeout=120)
    text = Path(str(log).replace("%j", str(job))).read_text()
    assert info.get("JobState") == "COMPLETED", f"{info}\n{text}"
    assert text == f"{cluster.host} slots=2\n"


@pytest.mark.parametrize(
    ("template", "opts", "scancel", "placement"),
    [
        # 2 tasks, each finds rank/world/master from SLURM; --signal=USR1@T reaches the ranks
        ("multi_node_srun.sbatch", ["--ntasks=2"], [], "2 rank(s) on 1 node(s) through srun"),
        # one task, the deepspeed launcher starts 2 ranks; --signal=B:USR1@T reaches the shell
        (
            "single_node_deepspeed.sbatch",
            [],
            ["--batch"],
            "2 rank(s) through the deepspeed launcher",
        ),
    ],
)
def test_template_stops_on_the_warning_signal_requeues_and_finishes(
    cluster, tmp_path, template, opts, scancel, placement
):
    """A template's 2-rank job on the CPU, stopped by the warning signal the template asks SLURM
    for (sent here with scancel, as SLURM sends it ahead of the time limit): the ranks
    checkpoint and exit with 75, the job requeues itself, and the second start continues from
    the checkpoint to the end."""
    out = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    env = dict(_job_env(), ROSA_DS_FAULT=f"slow@1-{STEPS}")
    job = cluster.sbatch(
        [*opts, f"--output={log}", str(REPO / "slurm" / template), f"output_dir={out}"]
        + TRAIN_ARGS,
        env=env,
        cwd=REPO,
    )
    wait_for_logged_step(out, 1)
    t0 = time.time()
    deadline = t0 + 300
    cluster._run(["scancel", "--signal=USR1", *scancel, str(job)])
    while time.time() < deadline:
        # SLURM holds a requeued job back (about two minutes) while the node cleans up after
        # the first start: once the node is idle again, start it at once
        info = cluster.job(job)
        pending = info.get("Restarts") == "1" and info.get("JobState") == "PENDING"
        if pending and cluster._node_idle():
            time.sleep(5)
            cluster._run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
            break
        if info.get("JobState") in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.5)
    print(f"\n{template}: requeued {time.time() - t0:.1f} s after the signal")
    info = cluster.wait(job, timeout=600)
    print(f"{template}: finished {time.time() - t0:.1f} s after the signal")
    text = Path(str(log).replace("%j", str(job))).read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED", f"{info}\n{text[-5000:]}\n{cluster.logs()}"
    assert "requeueing job" in text and "rosa-ds: stopped after step" in text, text[-5000:]
    assert int(info.get("Restarts", "0")) == 1, info
    assert "DS_ACCELERATOR=cpu" in text  # the template saw no GPU and chose the CPU
    assert placement in text, text[-3000:]
    assert latest_checkpoint(out) == checkpoint_root(out) / tag_for(STEPS), text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["resumed_from"] < STEPS, text[-3000:]
    assert len(summary["losses"]) == STEPS and summary["world_size"] == 2


def test_sweep_submits_one_job_array_whose_cells_finish(cluster, tmp_path):
    """``rosa-ds sweep --slurm``: two 1-rank cells as one array (``%2``), each task running the
    srun template with its cell's config; submitted again, nothing is left to submit."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "base: tiny-lora\n"
        "fixed: {train.max_steps: 2, eval.num_generate: 0, data.num_train: 64}\n"
        "axes:\n  adapter.rank: [2, 4]\n"
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rosa_ds.cli", "sweep", "--grid", str(grid), "--out", str(out),
           "--slurm", "--array-limit", "2"]  # fmt: skip
    env = dict(_job_env(), SLURM_CONF=str(cluster.conf))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "submitted job array" in proc.stdout and "(2 cell(s), 1 rank(s) each)" in proc.stdout
    job = int(proc.stdout.split("submitted job array ")[1].split()[0])
    summaries = [out / "runs" / f"rank-{r}" / "summary.json" for r in (2, 4)]
    deadline = time.time() + 300
    while time.time() < deadline and not all(s.is_file() for s in summaries):
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace") for p in (out / "logs").glob("*.out"))
    assert all(s.is_file() for s in summaries), f"{logs[-5000:]}\n{cluster.logs()}"
    for rank, s in zip((2, 4), summaries, strict=True):
        summary = json.loads(s.read_text())
        assert summary["steps"] == 2 and summary["trainable_elements"] > 0
        assert f"cell rank-{rank} (array task" in logs
    assert logs.count("rank(s) on 1 node(s) through srun") == 2  # the template ran each
    for _ in range(60):  # the tasks leave the queue
        states = cluster._run(["squeue", "-h", "-j", str(job), "-o", "%T"]).stdout.split()
        if not states:
            break
        time.sleep(1)
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr
