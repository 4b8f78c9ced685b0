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
    """sbatch options for ``world`` ranks: one task per rank, on as few nodes as fit."""
    if gpus_per_node <= 0:  # CPU nodes: one rank per task, one node
        return [f"--ntasks={world}", "--nodes=1"]
    per_node = min(world, gpus_per_node)
    return [
        f"--nodes={math.ceil(world / gpus_per_node)}",
        f"--ntasks-per-node={per_node}",
        f"--gpus-per-node={per_node}",
    ]


def array_script(out: Path, world: int, cells: list[PlannedCell]) -> str:
    names = " ".join(shlex.quote(c.cell.name) for c in cells)
    out_q = shlex.quote(str(out))
    return f"""#!/bin/bash
# rosa-ds sweep: {len(cells)} cell(s) of {world} rank(s), one per array task. Written by
# `rosa-ds sweep --slurm`; each task runs slurm/multi_node_srun.sbatch with its cell's config.
#SBATCH --job-name=rosa-ds-sweep-ws{world}
#SBATCH --output={out}/logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
set -euo pipefail
CELLS=({names})
CELL="${{CELLS[$SLURM_ARRAY_TASK_ID]}}"
if [ -f {out_q}/runs/"$CELL"/summary.json ]; then
    echo "rosa-ds sweep: cell $CELL finished before; nothing to do"
    exit 0
fi
export ROSA_DS_HOME="${{ROSA_DS_HOME:-{REPO}}}"
export ROSA_DS_PYTHON="${{ROSA_DS_PYTHON:-{sys.executable}}}"
export CONFIG={out_q}/configs/"$CELL".yaml
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
    jobs = []
    for world in sorted({c.cell.world_size for c in todo}):
        group = [c for c in todo if c.cell.world_size == world]
        script = out / "slurm" / f"array-ws{world}.sbatch"
        script.write_text(array_script(out, world, group))
        spec = f"0-{len(group) - 1}" + (f"%{limit}" if limit else "")
        cmd = [sbatch, "--parsable", f"--array={spec}", *resources(world, gpus_per_node)]
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
