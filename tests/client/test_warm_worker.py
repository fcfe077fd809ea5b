"""The warm worker: a relay's arguments, environment and streams reach a forked process,
its exit code comes back, a stopped relay stops its process, a stopped worker leaves
nothing; without a worker the relay says so and nothing starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.client.app_runner import SOCKET_ENV
from medfed.client.warm_worker import socket_path

# A worker whose forked processes run `_target` below instead of Flower's ClientApp process.
WORKER = """
import os, sys, time
from pathlib import Path
from medfed.client.warm_worker import Worker

def target():
    print("argv", " ".join(sys.argv[1:]), "env", os.environ.get("PROBE"), "cwd", os.getcwd(),
          "pid", os.getpid(), flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(60)
    sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else 0)

Worker(Path(sys.argv[1]), target).serve()
"""
RELAY = "import sys; from medfed.client.app_runner import relay, SOCKET_ENV; import os; " \
    "code = relay(os.environ[SOCKET_ENV]); print('relay', code, flush=True); " \
    "sys.exit(99 if code is None else code)"  # fmt: skip


@pytest.fixture
def worker(tmp_path):
    path = socket_path(tmp_path / "state")
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(path)])
    deadline = time.monotonic() + 30
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    yield path, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def _relay(path: Path, cwd: Path, *argv: str, wait: bool = True):
    env = {**os.environ, SOCKET_ENV: str(path), "PROBE": "from-the-relay"}
    command = [sys.executable, "-c", RELAY, *argv]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_relay_gets_its_process_output_and_exit_code(worker, tmp_path):
    path, process = worker
    first = _relay(path, tmp_path, "3", "--token", "x")
    assert first.returncode == 3, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"argv 3 --token x env from-the-relay cwd {tmp_path} pid ")
    assert lines[1] == "relay 3"
    child = int(lines[0].split()[-1])
    assert child != process.pid  # a process of its own, forked per relay
    second = _relay(path, tmp_path, "0")
    assert second.returncode == 0 and int(second.stdout.split()[7]) != child


def test_a_stopped_relay_stops_its_process(worker, tmp_path):
    path, _ = worker
    relay = _relay(path, tmp_path, "sleep", wait=False)
    child = int(relay.stdout.readline().split()[-1])
    relay.kill()
    relay.wait()
    assert _gone(child), "the forked process outlived its relay"


def test_a_stopped_worker_leaves_no_process_and_no_socket(worker, tmp_path):
    path, process = worker
    relay = _relay(path, tmp_path, "sleep", wait=False)
    child = int(relay.stdout.readline().split()[-1])
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert _gone(child) and not path.exists()
    relay.wait(timeout=10)


def test_without_a_worker_the_relay_starts_nothing_and_says_so(tmp_path):
    result = _relay(socket_path(tmp_path), tmp_path, "0")
    assert result.returncode == 99 and result.stdout.strip() == "relay None"


def test_the_worker_preloads_without_threads_or_cuda():
    """A fork copies a thread's locks, not the thread; a CUDA context must never be copied."""
    probe = (
        "import threading, torch; from medfed.client import warm_worker as w; w.preload(); "
        "import sys; print(threading.active_count(), torch.cuda.is_initialized(), "
        "all(m in sys.modules for m in w.PRELOADED))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["1", "False", "True"], result.stderr


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
