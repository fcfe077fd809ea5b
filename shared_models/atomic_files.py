"""Files written whole or not at all: a crash never leaves a truncated record or ledger."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, content: bytes | Callable[[Path], object]) -> None:
    """Write `content` (bytes, or a writer given a temporary path) and rename it into place.

    Readers see the old file or the new one, never a truncated one, even if
    the process dies mid-write; the temporary file is removed on any failure.
    A writer may create a folder: renaming it onto an existing non-empty
    folder fails with OSError, which callers use to detect a concurrent writer.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def durable_write(path: Path, data: bytes) -> None:
    """`atomic_write` of `data`, flushed to disk before it replaces `path`: a ledger that a
    crash could roll back would let a refused round through after a restart."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)
