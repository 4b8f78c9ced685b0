"""Notice a lost rank in seconds instead of hanging in a collective until the job's time runs out.

Every rank runs a background thread that bumps a counter (its heartbeat) in a small key-value
store hosted by rank 0 (``torch.distributed.TCPStore``, on a port of its own). Rank 0's thread
watches every rank's counter; the other ranks watch rank 0's and an ``abort`` key. A rank whose
counter has not moved for ``timeout`` seconds (killed, out of memory, its node gone) is named in
``abort``, and every rank that sees it prints one line and exits with code 1 at once, even when
its main thread is blocked inside a collective. A rank that fails with an exception writes its
reason into ``abort`` too, so the others stop as fast. The threads only read clocks and the
store, so a rank busy in a long computation keeps beating.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

from rosa_ds.dist import broadcast_object
from rosa_ds.errors import TrainingError, UserError

ABORT = "abort"
EXIT_CODE = 1


def _hb(rank: int) -> str:
    return f"hb/{rank}"


def _done(rank: int) -> str:
    return f"done/{rank}"


class Watchdog:
    """Heartbeats between ranks: a rank that stops beating is named and every rank exits."""

    def __init__(self, rank: int, world_size: int, timeout: float, resume_hint: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.interval = max(0.2, min(2.0, timeout / 10))
        self.resume_hint = resume_hint
        self.store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.enabled = world_size > 1 and timeout > 0

    # --- life cycle --------------------------------------------------------------------------
    def start(self) -> Watchdog:
        """Every rank calls this after the process group exists."""
        if not self.enabled:
            return self
        store_timeout = datetime.timedelta(seconds=max(self.timeout, 10))
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if self.rank == 0:
            self.store = dist.TCPStore(
                host, 0, None, True, timeout=store_timeout, wait_for_workers=False
            )
            port = self.store.port
        port = broadcast_object(port if self.rank == 0 else None)
        if self.rank != 0:
            self.store = dist.TCPStore(host, port, None, False, timeout=store_timeout)
        self.store.set(_hb(self.rank), "0")
        dist.barrier()  # every heartbeat key exists before anyone reads it
        self._thread = threading.Thread(target=self._loop, name="rosa-ds-watchdog", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        """A clean end on this rank: stop beating without the others taking it for a loss."""
        if not self.enabled or self._thread is None:
            return
        self.store.set(_done(self.rank), "1")
        self._stop.set()
        self._thread.join()
        dist.barrier()  # rank 0 keeps the store alive until every thread has let go of it

    def fail(self, exc: BaseException) -> None:
        """This rank is going down with an exception: tell the others so they stop too.

        A failed collective is usually the echo of another rank's death (gloo notices a closed
        socket at once): then wait for the heartbeats to name the lost rank, which exits this
        process with that message, before blaming this rank.
        """
        if not self.enabled or self.store is None:
            return
        if not isinstance(exc, UserError | TrainingError | KeyboardInterrupt):
            deadline = time.monotonic() + self.timeout + 3 * self.interval
            while time.monotonic() < deadline and self._thread is not None:
                if not self._thread.is_alive():
                    break
                time.sleep(self.interval)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            self.store.compare_set(ABORT, "", f"rank {self.rank} failed: {reason}")
            time.sleep(2 * self.interval)  # give the others' threads a chance to read it
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0
            pass

    # --- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        beats = 0
        watched = list(range(self.world_size)) if self.rank == 0 else [0]
        watched = [r for r in watched if r != self.rank]
        seen = {r: (None, time.monotonic()) for r in watched}
        last_contact = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                beats += 1
                self.store.set(_hb(self.rank), str(beats))
                if self.store.check([ABORT]):
                    self._exit(self.store.get(ABORT).decode())
                live = [r for r in watched if not self.store.check([_done(r)])]
                values = self.store.multi_get([_hb(r) for r in live]) if live else []
                last_contact = now
            except Exception:  # noqa: BLE001 - rank 0, which hosts the store, may be gone
                if now - last_contact > self.timeout:
                    self._exit(
                        f"lost contact with rank 0 for {now - last_contact:.0f} s "
                        "(killed, out of memory or its node failed)"
                    )
                continue
            for r, value in zip(live, values, strict=True):
                previous, since = seen[r]
                if value != previous:
                    seen[r] = (value, now)
                elif now - since > self.timeout:
                    reason = (
                        f"rank {r} stopped responding (no heartbeat for {now - since:.0f} s: "
                        "killed, out of memory or its node failed)"
                    )
                    if self.rank == 0:
                        self.store.compare_set(ABORT, "", reason)
                    self._exit(reason)

    def _exit(self, reason: str) -> None:
        hint = f"; {self.resume_hint}" if self.resume_hint else ""
        print(f"\nrosa-ds: error: rank {self.rank} stopping: {reason}{hint}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_CODE)
