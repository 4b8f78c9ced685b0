"""Write a DeepSpeed hostfile from a SLURM allocation, for the ``deepspeed`` launcher's multi-node
mode (run it inside the job, e.g. in the batch script):

    python -m launcher.hostfile -o hostfile          # or: python launcher/hostfile.py -o hostfile
    deepspeed --hostfile hostfile --launcher slurm launcher/main.py train --config NAME

One line per node of ``SLURM_JOB_NODELIST`` (expanded by ``scontrol show hostnames``):
``node01 slots=N``. The slots are, first found: ``--slots``; GPUs per node
(``SLURM_GPUS_ON_NODE``, ``SLURM_GPUS_PER_NODE``); ``SLURM_NTASKS_PER_NODE``; the per-node task
counts of ``SLURM_TASKS_PER_NODE`` (``2(x3),1``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rosa_ds.dist import slurm_hostnames  # noqa: E402
from rosa_ds.errors import UserError  # noqa: E402


def _count(value: str) -> int:
    """``4``, ``gpu:4``, ``a100:4`` or ``4(x2)`` -> 4."""
    m = re.search(r"(\d+)(\(x\d+\))?$", value.strip())
    if m is None:
        raise UserError(f"cannot read a count from {value!r}")
    return int(m.group(1))


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) as one count per node."""
    counts = []
    for item in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise UserError(f"cannot read SLURM_TASKS_PER_NODE={value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slots_per_node(hosts: list[str], env: dict[str, str], slots: int | None = None) -> list[int]:
    if slots is not None:
        return [slots] * len(hosts)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key):
            return [_count(env[key])] * len(hosts)
    if env.get("SLURM_TASKS_PER_NODE"):
        counts = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        if len(counts) == len(hosts):
            return counts
        raise UserError(
            f"SLURM_TASKS_PER_NODE gives {len(counts)} nodes, the node list {len(hosts)}; "
            "pass --slots"
        )
    raise UserError(
        "no GPUs or tasks per node in the environment (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, "
        "SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE); pass --slots N"
    )


def hostfile_text(
    env: dict[str, str], nodelist: str | None = None, slots: int | None = None
) -> str:
    """The hostfile for a SLURM allocation: ``host slots=N`` per node."""
    nodelist = nodelist or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("not inside a SLURM allocation (no SLURM_JOB_NODELIST); pass --nodelist")
    hosts = slurm_hostnames(nodelist)
    counts = slots_per_node(hosts, env, slots)
    return "".join(f"{h} slots={n}\n" for h, n in zip(hosts, counts, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launcher.hostfile",
        description="Write a DeepSpeed hostfile from the SLURM allocation this runs in.",
    )
    p.add_argument("--nodelist", help="SLURM node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, help="ranks per node (default: GPUs or tasks per node)")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = p.parse_args(argv)
    try:
        if args.slots is not None and args.slots < 1:
            raise UserError(f"--slots must be >= 1, got {args.slots}")
        text = hostfile_text(dict(os.environ), args.nodelist, args.slots)
    except UserError as exc:
        print(f"rosa-ds hostfile: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
