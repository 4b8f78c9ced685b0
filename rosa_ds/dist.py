"""Where this process stands in the job, and the few collectives the trainer needs.

Rank discovery reads what each launcher leaves in the environment, in this order:

1. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, the deepspeed launcher): ``torch``;
2. the MPI launchers' variables (Open MPI ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI ``PMI_*``,
   PMIx, MVAPICH2): ``mpi``;
3. a SLURM job step with more than one task (``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
   or ``SLURM_NTASKS``, ``SLURM_LOCALID``; the batch script itself is no step): ``slurm``;
4. an MPI launch whose variables are not among those above (``PMI_FD``, ``PMIX_NAMESPACE``, ...):
   asked through mpi4py: ``mpi``;
5. otherwise one process: ``single``.

``prepare_environment`` then fills what torch.distributed needs and the launcher did not set:
under MPI rank 0 picks the address and a free port and mpi4py broadcasts them; under SLURM the
address is the step's first node (``scontrol show hostnames``) and the port a function of the job
and step ids. Whatever the user exported (``MASTER_ADDR``, ``MASTER_PORT``) wins.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MPI_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
)
# Set by an MPI launcher for its processes even where the rank variables above are not.
MPI_HINTS = ("PMI_FD", "PMI_PORT", "PMI_ID", "PMIX_NAMESPACE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class Placement:
    """This process's rank, world size and local rank, and the launcher that placed it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _slurm_placement(env: dict[str, str]) -> Placement | None:
    """A task of a multi-task SLURM job step (srun), or None."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None  # not inside srun: the batch script, salloc's shell, or no SLURM at all
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return None
    return Placement(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm")


def _mpi4py_placement() -> Placement | None:
    """Rank, size and node-local rank from mpi4py (None: mpi4py missing or one process)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() <= 1:
        return None
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return Placement(comm.Get_rank(), comm.Get_size(), local, "mpi")


def detect_placement(env: dict[str, str] | None = None) -> Placement:
    """Rank, world size and local rank from the environment, before any process group exists.

    With ``env`` given only the variables are read; for the real environment (``env=None``) an
    MPI launch that exports none of the known rank variables is asked through mpi4py.
    """
    real = env is None
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torch"
        )
    for rank_var, size_var, local_var in MPI_VARS:
        if rank_var in env and size_var in env:
            return Placement(
                int(env[rank_var]), int(env[size_var]), int(env.get(local_var, 0)), "mpi"
            )
    slurm = _slurm_placement(env)
    if slurm is not None:
        return slurm
    if real and any(k in env for k in MPI_HINTS):
        found = _mpi4py_placement()
        if found is not None:
            return found
    return Placement(0, 1, 0, "single")


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous or a launcher's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- SLURM -----------------------------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list (``node[01-03,07],gpu-a[1-2]-x``) expanded in pure Python, for
    where ``scontrol`` is not available."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [host for item in items if item.strip() for host in _expand_item(item.strip())]


def _expand_item(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if hi:
            out += [f"{head}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(f"{head}{lo}{tail}")
    return [host for o in out for host in _expand_item(o)]


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list, by ``scontrol show hostnames`` (or the same expansion in
    Python where scontrol is missing)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=15,
        ).stdout
        hosts = out.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    return hosts or expand_nodelist(nodelist)


def slurm_master_addr(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04]`` -> ``node01``): task 0 runs there."""
    return slurm_hostnames(nodelist)[0]


def slurm_nodelist(env: dict[str, str]) -> str:
    """The nodes of this job step (a step may use part of the job's nodes)."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(key):
            return env[key]
    raise KeyError("SLURM_JOB_NODELIST")


def slurm_master_port(env: dict[str, str]) -> int:
    """A port every task of a step computes alike, different for the steps of one job and (in
    all likelihood) for jobs sharing a node; below Linux's ephemeral range."""
    job = int(env.get("SLURM_JOB_ID", "0"))
    step = int(env.get("SLURM_STEP_ID", "0") or 0)
    return 20000 + (job * 8 + step) % 12000


# --- MPI -------------------------------------------------------------------------------------


def _routable_address() -> str:
    """This host's address as other hosts see it (what DeepSpeed's MPI discovery uses)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError:
        return "127.0.0.1"


def _mpi_rendezvous() -> tuple[str, int]:
    """Rank 0's address and a free port on it, agreed by all ranks through mpi4py."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    names = comm.allgather(MPI.Get_processor_name())
    choice = None
    if comm.Get_rank() == 0:
        one_host = len(set(names)) == 1
        choice = ("127.0.0.1" if one_host else _routable_address(), _free_port_any())
    return comm.bcast(choice, root=0)


def _free_port_any() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def prepare_environment(placement: Placement) -> None:
    """Fill the variables torch.distributed needs where the launcher did not."""
    env = os.environ
    if placement.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif placement.launcher == "slurm":
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = slurm_master_addr(slurm_nodelist(dict(env)))
        env.setdefault("MASTER_PORT", str(slurm_master_port(dict(env))))
    elif placement.launcher == "mpi" and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        try:
            addr, port = _mpi_rendezvous()
        except ImportError:
            addr, port = None, None  # DeepSpeed's own MPI discovery will say what is missing
        if addr is not None:
            env.setdefault("MASTER_ADDR", addr)
            env.setdefault("MASTER_PORT", str(port))
    if placement.launcher in ("single", "slurm", "mpi"):
        env.setdefault("RANK", str(placement.rank))
        env.setdefault("WORLD_SIZE", str(placement.world_size))
        env.setdefault("LOCAL_RANK", str(placement.local_rank))


def default_backend(accelerator_name: str) -> str:
    return "nccl" if accelerator_name == "cuda" else "gloo"


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory all-reduce when the
    process group starts (30 s to minutes of gcc on a fresh machine, even for one process).

    The op serves only ``inference_all_reduce`` of tensor-parallel inference layers, which
    training never calls. DeepSpeed asks ``deepspeed.ops.__compatible_ops__`` before building
    and keeps edits to that dict, so marking the op incompatible is the switch."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_distributed(backend: str = "auto", timeout_minutes: float | None = None) -> Placement:
    """Start the process group through DeepSpeed (once) and return this process's placement.

    ``timeout_minutes`` bounds every collective, so a hang becomes an error in the end even
    where the heartbeat watchdog (``rosa_ds.watchdog``) is off."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    placement = detect_placement()
    prepare_environment(placement)
    device = get_accelerator().device_name()
    if device == "cpu":
        skip_shm_comm_build()
    if backend == "auto":
        backend = default_backend(device)
    kwargs = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=True, verbose=False, **kwargs
    )
    import torch.distributed as dist

    return Placement(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", placement.local_rank)),
        placement.launcher,
    )


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the process group (0, 1 without one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: the GPU for NCCL, the CPU for gloo/MPI."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (a no-op on one process)."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The maximum of a few floats over ranks (a no-op on one process)."""
    return _all_reduce(values, "MAX")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
