"""Stop a run cleanly when the scheduler asks: finish the optimizer step, checkpoint, exit.

A cluster warns a job before it ends it: SLURM sends SIGTERM at preemption and at the time
limit, then SIGKILL after its grace period (``KillWait``, often 30-120 s), and
``sbatch --signal=USR1@120`` asks for a warning signal two minutes ahead of the limit. The
signals named in ``train.stop_signals`` do not kill a rank: the handler only records that a stop
was asked for. The loop folds that flag into the all-reduce it already does after every
optimizer step, so every rank learns of a signal that reached any one of them at the same step;
then every rank writes the checkpoint (atomically, like any other) and the run exits with
``PREEMPTED_EXIT_CODE``, which the sbatch templates turn into a requeue. A second signal while
stopping changes nothing; a SIGKILL meanwhile leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, try again
SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """Every rank raises this after the stop checkpoint is written; the command line exits with
    ``PREEMPTED_EXIT_CODE``."""

    exit_code = PREEMPTED_EXIT_CODE


class StopRequest:
    """Handlers for the stop signals: they record the first signal and its time, nothing more."""

    def __init__(self, names: list[str], rank: int = 0, timeout: float = 0.0) -> None:
        self.names = list(names)
        self.rank = rank
        self.timeout = timeout  # seconds from the signal to a forced exit; 0: none
        self.signal_name: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Take over the signals (call from the main thread; it is a no-op elsewhere)."""
        for name in self.names:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (an embedded use): leave signals alone
                return self
        return self

    def ignore_from_now(self) -> None:
        """A rank leaving with ``PREEMPTED_EXIT_CODE`` ignores further stop signals and SIGTERM.

        A launcher that sees one rank exit first terminates the others (``srun
        --kill-on-bad-exit``), and they are still tearing down. A Python handler does not cover
        that: the interpreter resets Python handlers to the default, killing one, while it
        finalizes, so the rank would end by SIGTERM (143) and the job would not requeue. An
        ignored signal stays ignored to the end; SIGKILL still ends the process."""
        if not self._previous:
            return  # install() left the signals alone (not the main thread): so does this
        for signum in {getattr(signal, name) for name in self.names} | {signal.SIGTERM}:
            signal.signal(signum, signal.SIG_IGN)
        self._previous.clear()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            return  # a second signal while stopping: the stop checkpoint is on its way
        self.signal_name, self.received_at = name, time.monotonic()
        print(
            f"\nrosa-ds: rank {self.rank} received {name}: finishing this optimizer step, "
            f"writing a checkpoint, then exiting with code {PREEMPTED_EXIT_CODE}",
            file=sys.stderr,
            flush=True,
        )
        if self.timeout > 0:
            timer = threading.Timer(self.timeout, self._give_up)
            timer.daemon = True
            timer.start()

    def _give_up(self) -> None:
        """The stop took longer than allowed: leave now. The checkpoint being written is still a
        ``.tmp`` folder, so ``latest`` names the previous complete one."""
        print(
            f"rosa-ds: rank {self.rank}: no stop checkpoint within train.stop_timeout="
            f"{self.timeout:g} s of {self.signal_name}; exiting without it (resume starts from "
            "the previous checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PREEMPTED_EXIT_CODE)
