"""Peak memory of one process tree (a command and every process it started).

Machine-wide "memory in use" charges a benchmark for whatever else runs on the
machine; the RSS of each process double-counts the pages they share (torch's
libraries mapped into every Ray worker). The proportional set size (PSS)
splits each shared page between the processes that map it, so the sum over a
tree is what the tree costs. Descendants are found through /proc's parent
links, which also reaches processes that started their own session (Ray's
raylet and workers, Flower's SuperExec).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

PROC = Path("/proc")
GIB = 2**30


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: fields follow the last ')'
        found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def tree(root: int) -> set[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    members, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in members:
            members.add(pid)
            todo += children.get(pid, [])
    return members


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None once it is gone)."""
    try:
        return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pss_bytes(pid: int) -> int:
    """The process's proportional set size (0 once it is gone)."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakTreeMemory:
    """Samples the PSS of `root`'s tree every `interval` s while in use; `.peak` in bytes.

    It remembers every process it saw, so what outlived the root (Ray's workers are
    re-parented when their parent exits) can be killed by pid without `ray stop`,
    which would stop every Ray cluster on the machine.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval, self.peak = root, interval, 0
        self.seen: dict[int, int] = {}  # pid -> start time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def kill_leftovers(self) -> None:
        """SIGKILL every process of the tree still alive (the same pid and start time)."""
        for pid, started in self.seen.items():
            if start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def _sample(self) -> None:
        while not self._stop.is_set():
            members = tree(self.root)
            for pid in members:
                started = start_time(pid)
                if started is not None:
                    self.seen.setdefault(pid, started)
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in members))
            time.sleep(self.interval)
