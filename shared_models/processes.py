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
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TAG_ENV = "MEDFED_PROCESS_TAG"
# This command's tag: fresh per medfed process, so a command never stops its parent's work.
COMMAND_TAG = f"{os.getpid()}-{secrets.token_hex(6)}"
PROC = Path("/proc")
KILLED_WAIT = 5.0  # seconds a SIGKILLed process may take to release its memory and files


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


def _carries(pid: int, marker: bytes) -> bool:
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return marker in environ.split(b"\0")


def started_by(
    command_tag: str = COMMAND_TAG, spare: frozenset[int] = frozenset()
) -> dict[int, int]:
    """Live processes carrying `command_tag`, and every live descendant of them, by pid with
    their start time (a pid alone may be reused); `spare`'s pids are left out."""
    marker = f"{TAG_ENV}={command_tag}".encode()
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
            starts[int(entry.name)] = int(fields[19])
    found = {pid for pid in parents if _carries(pid, marker)} - spare
    while below := {pid for pid, parent in parents.items() if parent in found} - found - spare:
        found |= below
    found.discard(os.getpid())
    return {pid: starts[pid] for pid in found}


def stop_started(
    command_tag: str = COMMAND_TAG, grace: float = 5.0, spare: frozenset[int] = frozenset()
) -> set[int]:
    """SIGTERM everything `command_tag` started (but `spare`), SIGKILL what is left after
    `grace` seconds. Returns the pids still alive at the end (none, unless another user
    owns them).

    A killed process is waited for until it is gone: until then it still holds its
    files, and so its locks (a run folder's writer lock says whether its ServerApp lives).
    """
    targets = started_by(command_tag, spare)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        targets = {**targets, **started_by(command_tag, spare)}
        targets = {pid: start for pid, start in targets.items() if _still(pid, start)}
        if not targets:
            return set()
        time.sleep(0.1)
    _signal(targets, signal.SIGKILL)
    deadline = time.monotonic() + KILLED_WAIT
    while alive := {pid for pid, start in targets.items() if _still(pid, start)}:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return alive


def _still(pid: int, start: int) -> bool:
    """Whether `pid` is alive and still the process that started at `start`.

    A process whose main thread has ended is a zombie while its other threads are
    still exiting, and those still hold its files, and so its locks (a run
    folder's writer lock says whether its ServerApp lives): it is gone only once
    its main thread is its last.
    """
    fields = _stat(pid)
    if fields is None or fields[0] == "X" or int(fields[19]) != start:
        return False
    if fields[0] != "Z":
        return True
    try:
        return len(os.listdir(PROC / str(pid) / "task")) > 1
    except OSError:
        return False


def _signal(targets: dict[int, int], signum: int) -> None:
    for pid, start in targets.items():
        if _still(pid, start):  # never a process that took over a freed pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def identity(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, beyond its pid: the host, boot and pid namespace it runs in,
    and its start time."""
    pid = os.getpid() if pid is None else pid
    fields = _stat(pid)
    try:
        namespace = os.readlink(PROC / "self" / "ns" / "pid")
    except OSError:
        namespace = ""
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot": _read(PROC / "sys" / "kernel" / "random" / "boot_id"),
        "namespace": namespace,
        "start": int(fields[19]) if fields else -1,
    }


def liveness(recorded: object) -> str:
    """ "alive", "dead" or "unknown" for the process `identity` recorded.

    Dead only when this process can tell: the same host and pid namespace
    (another container or machine sees other pids), and either another boot
    or no process with that pid and start time. Anything else is unknown,
    and nothing is ever closed on an unknown.
    """
    if not isinstance(recorded, dict) or not isinstance(recorded.get("pid"), int):
        return "unknown"
    here = identity()
    if not (here["boot"] and recorded.get("boot")) or recorded.get("host") != here["host"]:
        return "unknown"
    if recorded.get("boot") != here["boot"]:
        return "dead"  # the machine restarted since
    if not here["namespace"] or recorded.get("namespace") != here["namespace"]:
        return "unknown"
    start = recorded.get("start")
    return "alive" if isinstance(start, int) and _still(recorded["pid"], start) else "dead"


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
