"""The project's own sbatch templates on a real one-node SLURM cluster (slurm-wlm + munge on
loopback, started and stopped by tests/slurm_cluster.py): 2 ranks of `tiny-lora` through srun,
and through the deepspeed launcher inside one task, each stopped by its warning signal, requeued
and finished. Skipped, with the reason, where no cluster
can be started (SLURM not installed, not root)."""

from __future__ import annotations

import json
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
