"""Files written whole or not at all: the content goes to a hidden temporary beside the target
and is renamed over it, so a reader (or a run resumed after a crash) sees the old file or the
new one, never part of one. A rename within one folder is atomic on POSIX file systems."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary beside ``path``, which then replaces ``path``; if
    ``write`` raises, ``path`` is untouched and the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
