"""A stop waits until what it stopped has let go of its files (and their locks)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from medfed.shared_models import processes

# On SIGTERM its main thread ends first and another thread a second later, holding the
# lock until then: a Ray driver (flwr-simulation, the ServerApp's process) ends like this.
MAIN_THREAD_FIRST = """
import ctypes, fcntl, os, signal, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
ended = threading.Event()
def end_main_thread(signum, frame):
    ended.set()
    ctypes.CDLL(None).pthread_exit(None)
signal.signal(signal.SIGTERM, end_main_thread)
threading.Thread(target=lambda: (ended.wait(), time.sleep(1.0))).start()
print("locked", flush=True)
"""


def _locked(path: str) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_stopped_process_is_gone_only_once_its_last_thread_is(tmp_path):
    lock, tag = str(tmp_path / ".writer.lock"), f"test-{os.getpid()}-{time.monotonic_ns()}"
    child = subprocess.Popen(
        [sys.executable, "-c", MAIN_THREAD_FIRST, lock],
        env={**os.environ, processes.TAG_ENV: tag},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "locked\n"
    started = time.monotonic()
    assert processes.stop_started(tag, grace=10.0) == set()
    assert not _locked(lock), "stop_started returned while the process still held its lock"
    assert time.monotonic() - started < 10.0, "it ended by itself, before any SIGKILL"
    child.wait(timeout=5)
