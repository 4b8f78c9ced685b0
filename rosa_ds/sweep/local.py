"""Run a sweep's cells one after another on this machine, each through the project's own
launchers: ``rosa-ds train`` for one rank, the ``deepspeed`` launcher for more.

Every run has ``train.auto_resume=true``, so a cell that was stopped continues from its last
checkpoint. Ctrl-C, SIGTERM or SIGHUP stops the running cell as a preemption would (it
finishes its optimizer step, writes a checkpoint and exits with 75) and then the sweep, with 75;
the same command later skips the finished cells and continues the stopped one. A cell holds a
lock while it runs, so two sweeps over one folder never train the same cell at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import psutil
from filelock import FileLock, Timeout

from rosa_ds.dist import free_port
from rosa_ds.preemption import PREEMPTED_EXIT_CODE
from rosa_ds.sweep.cells import ENTRY, PlannedCell


def train_command(cell: PlannedCell) -> list[str]:
    args = ["train", "--config", str(cell.config_file), "train.auto_resume=true"]
    if cell.cell.world_size == 1:
        return [sys.executable, "-m", "rosa_ds.cli", *args]
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(cell.cell.world_size),
        "--master_port",
        str(free_port()),
        str(ENTRY),
        *args,
    ]


def _ranks(proc: subprocess.Popen, world: int) -> list[psutil.Process]:
    """The rank processes of a running cell: the run itself (one rank), else the children of
    the launcher the ``deepspeed`` runner starts. Nothing else (the launchers kill their ranks
    on a signal; a rank's own helpers are its business)."""
    if proc.poll() is not None:
        return []
    try:
        root = psutil.Process(proc.pid)
        if world == 1:
            return [root]
        return [rank for launch in root.children() for rank in launch.children()]
    except psutil.Error:
        return []


class _Stop:
    """Turns Ctrl-C, SIGTERM and SIGHUP into a clean stop of the running cell's ranks: each
    finishes its optimizer step and writes a checkpoint. A second signal stops the waiting:
    the ranks are killed (their last complete checkpoint stays the one to resume)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = 0
        self.saved: dict[int, object] = {}

    def __enter__(self) -> _Stop:
        for sig in self.SIGNALS:
            self.saved[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested += 1
        what = "stopping the running cell at its next optimizer step (a checkpoint is written)"
        if self.requested > 1:
            what = "second signal: killing the running cell"
        print(f"rosa-ds sweep: {signal.Signals(signum).name}: {what}", file=sys.stderr)

    def wait(self, proc: subprocess.Popen, world: int) -> int:
        """The cell's exit code. Ranks that appear after a stop was asked (a launcher still
        starting them) are asked too."""
        asked: set[int] = set()
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if not self.requested:
                continue
            sig = signal.SIGTERM if self.requested == 1 else signal.SIGKILL
            for rank in _ranks(proc, world):
                if rank.pid not in asked or sig == signal.SIGKILL:
                    with contextlib.suppress(psutil.Error):
                        rank.send_signal(sig)
                    asked.add(rank.pid)
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def run_local(cells: list[PlannedCell], log_dir: Path) -> int:
    """0 when every cell that was to run finished; 75 when stopped with cells left; 1 when a
    cell failed (the others still run)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    todo = [c for c in cells if not c.skip]
    with _Stop() as stop:
        for i, cell in enumerate(todo, 1):
            name = cell.cell.name
            head = f"[{i}/{len(todo)}] {name}"
            if cell.done:
                print(f"{head}: finished before, skipped", flush=True)
                continue
            if stop.requested:
                break
            lock = FileLock(str(cell.output_dir) + ".lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                print(f"{head}: running in another sweep (locked), skipped", flush=True)
                continue
            try:
                log = log_dir / f"{name}.log"
                print(f"{head}: {cell.cell.world_size} rank(s), log {log}", flush=True)
                t0 = time.time()
                with log.open("a") as fh:
                    # a session of its own: a Ctrl-C at the terminal reaches the sweep, which
                    # stops the ranks cleanly, rather than killing them mid-step
                    proc = subprocess.Popen(
                        train_command(cell),
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    code = stop.wait(proc, cell.cell.world_size)
            finally:
                lock.release()
            seconds = time.time() - t0
            if code == 0:
                print(f"{head}: finished in {seconds:.1f} s", flush=True)
            elif code == PREEMPTED_EXIT_CODE:
                print(f"{head}: stopped with a checkpoint after {seconds:.1f} s", flush=True)
                stop.requested = stop.requested or 1  # a rank was stopped from outside
            elif stop.requested:  # killed before it could take the signal, or a second one
                print(f"{head}: stopped after {seconds:.1f} s (exit {code})", flush=True)
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                print(f"{head}: FAILED with exit code {code}: {tail[0][:300]}", flush=True)
                failed.append(name)
    left = [c.cell.name for c in todo if not c.done and c.cell.name not in failed]
    if stop.requested and left:
        print(
            "rosa-ds sweep: stopped; run the same command again to continue (finished cells "
            "are skipped, a stopped one resumes from its checkpoint)",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    if failed:
        print(f"rosa-ds sweep: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
