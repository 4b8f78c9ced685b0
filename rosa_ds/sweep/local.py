"""Run a sweep's cells one after another on this machine, each through the project's own
launchers: ``rosa-ds train`` for one rank, the ``deepspeed`` launcher for more.

Every run has ``train.auto_resume=true``, so a cell that was stopped continues from its last
checkpoint. Ctrl-C or SIGTERM stops the running cell as a preemption would (it finishes its
optimizer step, writes a checkpoint and exits with 75) and then the sweep, with 75; the same
command later skips the finished cells and continues the stopped one.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import psutil

from rosa_ds.errors import UserError
from rosa_ds.preemption import PREEMPTED_EXIT_CODE
from rosa_ds.sweep.cells import PlannedCell

ENTRY = Path(__file__).resolve().parents[2] / "launcher" / "main.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(cell: PlannedCell) -> list[str]:
    args = ["train", "--config", str(cell.config_file), "train.auto_resume=true"]
    if cell.cell.world_size == 1:
        return [sys.executable, "-m", "rosa_ds.cli", *args]
    if not ENTRY.is_file():
        raise UserError(
            f"cell {cell.cell.name} needs {cell.cell.world_size} ranks, which the sweep starts "
            f"through launcher/main.py, not found at {ENTRY}; run the sweep from a checkout"
        )
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(cell.cell.world_size),
        "--master_port",
        str(_free_port()),
        str(ENTRY),
        *args,
    ]


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes of a cell's run: the run itself (one rank) or the launcher's
    grandchildren; the launchers are left alone (they kill their ranks on a signal)."""
    try:
        root = psutil.Process(proc.pid)
        found = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for p in found:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "deepspeed.launcher" not in cmd:
            ranks.append(p)
    return ranks


class _Stop:
    """Turns Ctrl-C and SIGTERM into a clean stop of the running cell's ranks."""

    def __init__(self) -> None:
        self.requested = False
        self.proc: subprocess.Popen | None = None
        self.saved: dict[int, object] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        print(
            f"rosa-ds sweep: {signal.Signals(signum).name}: stopping the running cell at its "
            "next optimizer step (a checkpoint is written)",
            file=sys.stderr,
        )
        if self.proc is not None:
            for p in _ranks(self.proc):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)


def run_local(cells: list[PlannedCell], log_dir: Path) -> int:
    """0 when every cell that was to run finished; 75 when stopped; 1 when a cell failed."""
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
            log = log_dir / f"{name}.log"
            print(f"{head}: {cell.cell.world_size} rank(s), log {log}", flush=True)
            t0 = time.time()
            with log.open("a") as fh:
                # a session of its own: a Ctrl-C at the terminal reaches the sweep, which
                # stops the ranks cleanly, rather than killing them mid-step
                stop.proc = subprocess.Popen(
                    train_command(cell), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                )
                code = stop.proc.wait()
                stop.proc = None
            seconds = time.time() - t0
            if code == 0:
                print(f"{head}: finished in {seconds:.1f} s", flush=True)
            elif code == PREEMPTED_EXIT_CODE:
                print(f"{head}: stopped with a checkpoint after {seconds:.1f} s", flush=True)
                stop.requested = True
                break
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                print(f"{head}: FAILED with exit code {code}: {tail[0][:300]}", flush=True)
                failed.append(name)
    if stop.requested:
        print(
            "rosa-ds sweep: stopped; run the same command again to continue (finished cells "
            "are skipped, the stopped one resumes from its checkpoint)",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    if failed:
        print(f"rosa-ds sweep: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
