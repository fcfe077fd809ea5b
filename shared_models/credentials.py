"""Credentials files: a command refuses to start without them, and never overwrites one."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class CredentialsError(ValueError):
    """A command cannot start without a credentials file; the message names it."""


def require_files(files: Iterable[tuple[Path | None, str]], advice: str = "") -> None:
    """Raise CredentialsError naming the first (path, what) whose path is not a file."""
    for path, what in files:
        if path is not None and not path.is_file():
            raise CredentialsError(f"{what} {path}: file not found{advice}")


def write_new_file(path: Path, data: bytes, private: bool) -> None:
    """Create `path` (0600 when `private`); an existing file is never overwritten."""
    if path.exists():
        raise CredentialsError(
            f"{path} already exists; refusing to overwrite it "
            "(move it away first if you really mean to replace it)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
