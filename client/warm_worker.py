"""The hospital's warm worker: Flower's ClientApp processes forked from one that has
already imported torch, MONAI and medfed's handlers.

A SuperNode starts a fresh `flwr-clientapp` process for every message, and
each one spent 3-5 s importing torch and MONAI before it did any work (more
with three at once on two cores: docs/benchmarks.md). `medfed node start`
runs this worker next to the SuperNode. medfed's `flwr-clientapp`
(client/app_runner.py) is then a relay: it hands its arguments, environment
and standard streams to the worker over a Unix socket in the node's state
folder and waits. The worker forks; the child is Flower's ClientApp process
with the approval check in place, exactly as the relay would have run it (the
check runs before any app package is installed or loaded, and fails closed).

Guards, because a fork copies the parent:
- the parent never runs tensor work nor touches CUDA (each child builds its
  own CUDA context) and stays single-threaded: it accepts, forks and reaps;
- `gc.freeze()` before serving, so the children share the imported modules'
  pages instead of copying them when the collector walks them;
- a child whose relay vanished (the SuperExec stopped the task) is killed;
  stopping the worker kills its children;
- only a process of the node's own user may connect (SO_PEERCRED).

Why not a process per run that keeps the installed package, the opened site
and torch's first-use state (as NVIDIA FLARE's job process does): measured
(tests/bench/clientapp_shapes.py, docs/benchmarks.md) it saves about 0.2 s of
a training message's 0.4 s on a CPU, a few per cent of a deployed round whose
time is Flower's transfers, and it would replace Flower's ClientApp process
logic (task pull, heartbeat, context push, exit on a stopped task) with
medfed's own and let one run's messages share a process. Forking keeps
Flower's logic and the approval hook as they are. On a GPU a process per run
would also keep the CUDA context (not measured: no GPU here).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfed.client.app_runner import STATUS, run_approved

SOCKET_NAME = "worker.sock"
# A request: JSON {argv, env, cwd} with the relay's stdin, stdout and stderr attached.
MAX_REQUEST = 1 << 20
STREAMS = 3
# What the children need, imported once here (none of it starts a thread or touches CUDA).
PRELOADED = (
    "torch",
    "torch._dynamo",  # imported by the first optimizer a process builds: 2 s here
    "torch.utils.data",
    "torch.profiler",
    "PIL.Image",
    "monai",
    "medfed.client.app",
    "medfed.client.handlers",
    "medfed.client.bundle_handlers",
    "medfed.client.app_runner",
    "medfed.client.approval",
    "flwr.supernode.cli.flwr_clientapp",
)


def socket_path(state: Path) -> Path:
    """The worker's socket in a node's state folder."""
    return state / SOCKET_NAME


def preload() -> None:
    """Import what every ClientApp process needs, and freeze it out of the collector."""
    import importlib

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # never a CUDA context here
    for module in PRELOADED:
        importlib.import_module(module)
    sys.modules["PIL.Image"].init()  # its format plugins, which the first image read loads
    gc.collect()
    gc.freeze()


@dataclass
class _Task:
    """One forked ClientApp process and the relay that waits for it."""

    pid: int
    pidfd: int
    relay: socket.socket | None  # None once the relay has gone


class Worker:
    """Accepts relays on `path` and forks a process for each that runs `target` (Flower's
    ClientApp process, approval check first) with the relay's arguments and streams."""

    def __init__(self, path: Path, target: Callable[[], None]) -> None:
        self.path = path
        self.target = target
        self.selector = selectors.DefaultSelector()
        self.tasks: dict[int, _Task] = {}  # by pid
        self.listener = self._listen(path)
        self.stopping = False

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket file is the node user's only
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(64)
        return listener

    def serve(self) -> None:
        """Fork a ClientApp process per relay until asked to stop (SIGTERM or SIGINT)."""

        def stop(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=0.5):
                    self._dispatch(key.data, key.fileobj)
        finally:
            self.close()

    def _dispatch(self, what: object, source: object) -> None:
        if what == "accept":
            self._accept()
        elif isinstance(what, tuple) and what[0] == "ended":
            self._ended(self.tasks[what[1]])
        elif isinstance(what, tuple) and what[0] == "relay":
            self._relay_gone(self.tasks[what[1]])

    def _accept(self) -> None:
        relay, _ = self.listener.accept()
        try:
            request, streams = _receive(relay)
        except (OSError, ValueError) as error:
            print(f"medfed worker: refused a request: {error}", file=sys.stderr, flush=True)
            relay.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: never returns
            self.listener.close()
            _run_child(request, streams, relay, self.target)
        for fd in streams:
            os.close(fd)
        task = _Task(pid, os.pidfd_open(pid), relay)
        self.tasks[pid] = task
        self.selector.register(task.pidfd, selectors.EVENT_READ, ("ended", pid))
        self.selector.register(relay, selectors.EVENT_READ, ("relay", pid))

    def _ended(self, task: _Task) -> None:
        _, status = os.waitpid(task.pid, 0)
        if task.relay is not None:
            with contextlib.suppress(OSError):
                task.relay.send(STATUS.pack(status))
        self._forget(task)

    def _relay_gone(self, task: _Task) -> None:
        """The relay ended first (its task was stopped): so does the ClientApp process."""
        _kill(task.pid)
        self._drop_relay(task)

    def _drop_relay(self, task: _Task) -> None:
        if task.relay is not None:
            self.selector.unregister(task.relay)
            task.relay.close()
            task.relay = None

    def _forget(self, task: _Task) -> None:
        self.selector.unregister(task.pidfd)
        os.close(task.pidfd)
        self._drop_relay(task)
        del self.tasks[task.pid]

    def close(self) -> None:
        """Kill every ClientApp process still running and remove the socket."""
        for task in list(self.tasks.values()):
            _kill(task.pid)
            os.waitpid(task.pid, 0)
            self._forget(task)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _kill(pid: int) -> None:
    """Kill a ClientApp process and its group (it may not have made its group yet)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


def _receive(relay: socket.socket) -> tuple[dict, list[int]]:
    """A relay's request, from a process of this node's own user only."""
    creds = relay.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise ValueError(f"a process of user {uid} is not this node's")
    data, fds, _, _ = socket.recv_fds(relay, MAX_REQUEST, STREAMS)
    if len(fds) != STREAMS:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"{len(fds)} streams attached, expected {STREAMS}")
    request = json.loads(data)
    if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
        raise ValueError("a request without argv or env")
    return request, fds


def _run_child(
    request: dict, streams: list[int], relay: socket.socket, target: Callable[[], None]
) -> None:
    """In the forked child: become the relay's process, run `target`, then exit."""
    code = 1
    try:
        relay.close()
        os.setsid()  # its own group: killed as one, with whatever it starts
        for stream, fd in enumerate(streams):
            os.dup2(fd, stream)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd") or "/")
        sys.argv = list(request["argv"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        target()
        code = 0
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else 1
    except BaseException as error:  # the child must never return into the worker's loop
        print(f"medfed worker: ClientApp process failed: {error!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    """`python -m medfed.client.warm_worker STATE`: serve the node whose state folder is STATE."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m medfed.client.warm_worker NODE_STATE_FOLDER")
    preload()
    if threading.active_count() != 1:  # a fork would copy a thread's locks, not the thread
        sys.exit(f"medfed worker: {threading.active_count()} threads after imports: not forking")
    worker = Worker(socket_path(Path(sys.argv[1])), run_approved)
    print(f"medfed worker ready ({os.getpid()}): {worker.path}", flush=True)
    worker.serve()


if __name__ == "__main__":
    main()
