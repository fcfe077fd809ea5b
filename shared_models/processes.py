"""Every process a medfed command started, found and stopped however it detached.

Flower's SuperExec, `flwr-simulation` and `flwr-serverapp` start in sessions
of their own, and Ray's workers hang two levels below a raylet, so neither
a child's process group nor its session reaches them. Each medfed command
therefore gives the processes it starts a tag in their environment, which
everything below them inherits; stopping means signalling every process
that carries the tag or descends from one that does. The same module tells
whether a recorded process (a run's ServerApp) is still the one running:
a pid alone is not enough after a reboot or pid reuse. Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TAG_ENV = "MEDFED_PROCESS_TAG"
# This command's tag: fresh per medfed process, so a command never stops its parent's work.
COMMAND_TAG = f"{os.getpid()}-{secrets.token_hex(6)}"
PROC = Path("/proc")


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a medfed command: stop everything, record why."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def tag(env: dict[str, str]) -> dict[str, str]:
    """`env` with this command's tag: every process started with it is stopped with it."""
    env[TAG_ENV] = COMMAND_TAG
    return env


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (None when gone)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # zombies are already dead


def _carries(pid: int, marker: bytes) -> bool:
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return marker in environ.split(b"\0")


def started_by(command_tag: str = COMMAND_TAG) -> set[int]:
    """Live processes carrying `command_tag`, and every live descendant of them."""
    marker = f"{TAG_ENV}={command_tag}".encode()
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found = {pid for pid in parents if _carries(pid, marker)}
    grew = True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in found} - found
        found |= below
        grew = bool(below)
    return found - {os.getpid()}


def stop_started(command_tag: str = COMMAND_TAG, grace: float = 5.0) -> set[int]:
    """SIGTERM everything `command_tag` started, SIGKILL what is left after `grace` seconds.

    Returns the pids still alive at the end (none, unless another user owns them).
    """
    targets = started_by(command_tag)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        targets = {pid for pid in targets | started_by(command_tag) if _alive(pid)}
        if not targets:
            return set()
        time.sleep(0.1)
    _signal(targets | started_by(command_tag), signal.SIGKILL)
    time.sleep(0.2)
    return {pid for pid in targets if _alive(pid)}


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _boot_id() -> str:
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return "unknown"


def identity(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, beyond its pid: the boot it runs in and its start time."""
    pid = os.getpid() if pid is None else pid
    fields = _stat(pid)
    return {"pid": pid, "boot": _boot_id(), "start": int(fields[19]) if fields else -1}


def is_running(recorded: dict[str, Any]) -> bool:
    """Whether the process `identity` recorded is still the one running (same boot and
    start time: a reboot or a reused pid is not it)."""
    pid = recorded.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    now = identity(pid)
    return now["boot"] == recorded.get("boot") and now["start"] == recorded.get("start")


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise StopRequested in the main thread while inside.

    Python turns only SIGINT into an exception; a supervisor's or CI's SIGTERM
    would otherwise end the command at once, skipping every clean-up.
    """

    def raise_stop(signum: int, frame: object) -> None:
        raise StopRequested(signum)

    previous = {s: signal.signal(s, raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Clean-up that a second Ctrl-C must not cut short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
