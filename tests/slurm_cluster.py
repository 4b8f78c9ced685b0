"""A real one-node SLURM cluster on loopback, for tests: munged, slurmctld and slurmd from
Debian's ``slurm-wlm`` and ``munge``, run as root in the foreground with every file (key, socket,
config, state, spool, logs) in one temporary folder and non-default ports, so nothing touches
the machine's own ``/etc/slurm`` or ``/etc/munge`` and several clusters can coexist.

    with LocalSlurm.start(tmp_path) as cluster:
        job = cluster.sbatch(["slurm/multi_node_srun.sbatch", "output_dir=..."], env={...})
        info = cluster.wait(job)            # scontrol's fields once the job has ended

``LocalSlurm.unavailable()`` says why a cluster cannot be started here (None if it can).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).is_file()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    """The cluster could not be started: the message says which daemon and shows its log."""


class LocalSlurm:
    def __init__(self, root: Path, cpus: int) -> None:
        self.root = root
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # --- availability ----------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why no cluster can be started here, or None."""
        if os.name != "posix" or os.geteuid() != 0:
            return "a local SLURM cluster needs root (slurmd runs jobs as their user)"
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            return (
                f"SLURM/munge not installed (missing {', '.join(missing)}): "
                "apt-get install -y --no-install-recommends slurm-wlm munge"
            )
        return None

    # --- start / stop ----------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, cpus: int = 2, timeout: float = 60) -> LocalSlurm:
        cluster = cls(Path(root), cpus)
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
            (r / sub).chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        lines = [
            "ClusterName=rosatest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'log' / 'jobcomp.txt'}",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - kept with the process
        self.procs[name] = subprocess.Popen(
            [_which(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def _start(self, timeout: float) -> None:
        r = self.root
        self._write_config()
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={r / 'munge' / 'munge.key'}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), "munged", timeout)
        self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf)])
        self._wait_for(
            lambda: self._run(["scontrol", "ping"]).returncode == 0, "slurmctld", timeout
        )
        self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(self._node_idle, "slurmd", timeout)

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.strip()
        return out.startswith("idle")

    def _wait_for(self, ready, name: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for daemon, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{daemon} exited with {proc.returncode}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s\n{self.logs()}")

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-tail:]
            parts.append(f"--- {f.name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged (in that order)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--user=root"], timeout=20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # --- clients ---------------------------------------------------------------------------
    def _run(self, args: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which(args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=kw.pop("env", self.env),
            timeout=timeout,
            **kw,
        )

    def sbatch(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        """Submit a batch script (``args``: sbatch options, the script, the script's arguments)
        with ``env`` as the job's environment; returns the job id."""
        job_env = dict(env or os.environ, SLURM_CONF=str(self.conf))
        proc = self._run(["sbatch", "--parsable", *args], env=job_env, cwd=cwd)
        if proc.returncode != 0:
            raise ClusterError(f"sbatch failed: {proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, RunTime, StdOut, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(1)
        self._run(["scancel", str(job_id)])
        raise ClusterError(f"job {job_id} did not finish in {timeout:.0f} s\n{self.logs()}")
