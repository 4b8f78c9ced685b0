"""A sweep as SLURM job arrays: one array task per cell, each running the project's own
``slurm/multi_node_srun.sbatch`` (one task per rank) with the cell's config, so preemption,
the warning signal, requeue and ``train.auto_resume`` work as for a single job.

Cells are grouped by world size (an array has one resource request): one array per size.
A task whose cell is finished exits at once, so resubmitting a sweep reruns only what is left.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rosa_ds.errors import UserError
from rosa_ds.sweep.cells import PlannedCell

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "multi_node_srun.sbatch"


def resources(world: int, gpus_per_node: int) -> list[str]:
    """sbatch options for ``world`` ranks: one task per rank, on as few nodes as fit (whole
    nodes: a world size over one node must be a multiple of its GPUs)."""
    if gpus_per_node <= 0:  # CPU nodes: one rank per task, one node
        return [f"--ntasks={world}", "--nodes=1"]
    if world > gpus_per_node and world % gpus_per_node:
        raise UserError(
            f"world size {world} does not fill nodes of {gpus_per_node} GPUs; use a multiple "
            f"of {gpus_per_node} (or --gpus-per-node to match the nodes)"
        )
    per_node = min(world, gpus_per_node)
    return [
        f"--nodes={math.ceil(world / gpus_per_node)}",
        f"--ntasks-per-node={per_node}",
        f"--gpus-per-node={per_node}",
    ]


def array_script(out: Path, world: int, cells: list[PlannedCell]) -> str:
    """One array task per cell: skip a finished cell, hold the cell's lock while it runs (a
    resubmitted sweep never trains one cell twice at once), then the srun template."""
    names = " ".join(shlex.quote(c.cell.name) for c in cells)
    q = shlex.quote
    return f"""#!/bin/bash
# rosa-ds sweep: {len(cells)} cell(s) of {world} rank(s), one per array task. Written by
# `rosa-ds sweep --slurm`; each task runs slurm/multi_node_srun.sbatch with its cell's config.
#SBATCH --job-name=rosa-ds-sweep-ws{world}
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
set -euo pipefail
OUT={q(str(out))}
CELLS=({names})
CELL="${{CELLS[$SLURM_ARRAY_TASK_ID]}}"
if [ -f "$OUT/runs/$CELL/summary.json" ]; then
    echo "rosa-ds sweep: cell $CELL finished before; nothing to do"
    exit 0
fi
exec 9>"$OUT/runs/$CELL.lock"
if ! flock -n 9; then
    echo "rosa-ds sweep: cell $CELL is running in another job; nothing to do"
    exit 0
fi
[ -n "${{ROSA_DS_HOME:-}}" ] || ROSA_DS_HOME={q(str(REPO))}
[ -n "${{ROSA_DS_PYTHON:-}}" ] || ROSA_DS_PYTHON={q(sys.executable)}
export ROSA_DS_HOME ROSA_DS_PYTHON
export CONFIG="$OUT/configs/$CELL.yaml"
echo "rosa-ds sweep: cell $CELL (array task $SLURM_ARRAY_TASK_ID, job ${{SLURM_JOB_ID:-?}})"
exec bash "$ROSA_DS_HOME/slurm/multi_node_srun.sbatch"
"""


def submit(
    out: Path,
    cells: list[PlannedCell],
    limit: int | None,
    gpus_per_node: int,
    sbatch_args: list[str],
) -> list[int]:
    """Write one array script per world size and submit it; returns the job ids."""
    todo = [c for c in cells if not c.skip and not c.done]
    if not todo:
        print("rosa-ds sweep: every cell is finished or skipped; nothing to submit")
        return []
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sweep --slurm needs sbatch on PATH; run it on a SLURM login node")
    if not TEMPLATE.is_file():
        raise UserError(f"sweep --slurm needs the repository's {TEMPLATE}; run from a checkout")
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for world in {c.cell.world_size for c in todo}:
        resources(world, gpus_per_node)  # every group's request is possible, before any submit
    jobs = []
    for world in sorted({c.cell.world_size for c in todo}):
        group = [c for c in todo if c.cell.world_size == world]
        script = out / "slurm" / f"array-ws{world}.sbatch"
        script.write_text(array_script(out, world, group))
        spec = f"0-{len(group) - 1}" + (f"%{limit}" if limit else "")
        log = str(out / "logs" / f"ws{world}-%A_%a.out")
        cmd = [sbatch, "--parsable", f"--array={spec}", f"--output={log}"]
        cmd += resources(world, gpus_per_node)
        cmd += [*sbatch_args, str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"sbatch refused {script}: {proc.stderr.strip()[:500]}")
        job = int(proc.stdout.strip().split(";")[0])
        jobs.append(job)
        print(
            f"rosa-ds sweep: submitted job array {job} ({len(group)} cell(s), {world} rank(s) each): {script}"
        )
    return jobs
