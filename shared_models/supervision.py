"""Flower services both roles run: started in a session of their own, supervised, stopped by pid.

A coordinator and a hospital node do the same housekeeping around Flower:
an environment without telemetry or update checks, a service started in its
own session and stopped (with its children) by pid, supervision in the
foreground until a stop is asked for or a service ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfed.shared_models import processes
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.metrics_exporter import export_metrics


def service_env(state: Path, audit_log: Path, metrics: tuple[int | None, str]) -> dict[str, str]:
    """The environment of a Flower service kept in `state`: its own FLWR_HOME, its audit
    log and, when a metrics port is given, a fresh exporter at (port, host)."""
    state.mkdir(parents=True, exist_ok=True)
    env = flower_env(state / "flwr-home")
    env[AUDIT_ENV] = str(audit_log)
    port, host = metrics
    if port is not None:
        export_metrics(state / "metrics", port, host, env)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def executable(name: str) -> str:
    """A Flower console script from medfed's own environment, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"'{name}' not found: is flwr installed in this environment?")
    return found


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update checks, no `uv sync`."""
    # FLWR_INTERNAL_* switches turn on Flower's legacy gRPC APIs on all interfaces,
    # past the proxy: a Flower process of medfed's never inherits them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # Ray merges log lines that differ only in numbers across its workers: site-1's
            # "skipped case_0004" showed only as "[repeated 6x across cluster]" under site-0's.
            "RAY_DEDUP_LOGS": "0",
            "PYTHONWARNINGS": "ignore",
        }
    )
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    processes.tag(env)  # whatever Flower detaches from it is still found and stopped
    # Flower's own console scripts (flwr-simulation, flwr-serverapp) are found on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start(command: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `command` in its own session (so its children can be stopped with it)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str, log_file: Path
) -> None:
    """Return once `ready()`; RuntimeError naming the log if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log_file}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; see {log_file}")


def http_healthy(port: int) -> Callable[[], bool]:
    """A probe of a Flower service's /health endpoint on 127.0.0.1."""

    import httpx  # late: the hospital's data layer imports this module on every message

    def probe() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    return probe


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class Service:
    """One long-running process a medfed command keeps in the foreground."""

    command: list[str]
    env: dict[str, str]
    log_file: Path | None = None  # None: its output goes to this terminal
    # Called with its exit code when it ends by itself; the service is then started
    # again instead of stopping the others (a helper the rest can run without).
    restart: Callable[[int], None] | None = None

    def start(self) -> subprocess.Popen:
        """Start it in a session of its own."""
        if self.log_file is None:
            return subprocess.Popen(self.command, env=self.env, start_new_session=True)
        return start(self.command, self.log_file, self.env)


def supervise(
    services: list[Service],
    grace: float = 15.0,
    watch: Callable[[], None] | None = None,
    every: float = 5.0,
) -> int:
    """Run services in the foreground until a stop is asked for or one of them ends.

    SIGINT or SIGTERM stops every one of them (each in its own session, with
    its children) and is a clean exit, 0. A service that ends by itself stops
    the others too (a proxy without its SuperLink is of no use), and its code
    is returned. Either way, whatever the services detached (Flower's
    SuperExec and app processes, in sessions of their own) is stopped too.
    `watch` runs every `every` seconds meanwhile (a failing watch is reported,
    never fatal). The handler only notes the signal: the loop stops what the
    services started first, then the services (waiting on a child inside a
    signal handler would deadlock with the main thread's own wait), and
    escalates to SIGKILL after `grace` seconds.
    """
    children = [s.start() for s in services]
    stopping_since: list[float] = []  # when the stop began (asked for, or a service ended)
    asked: list[int] = []

    def signal_all(signum: int) -> None:
        for process in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    def stop(signum: int, frame: object) -> None:
        asked.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    first_code: int | None = None
    watched = time.monotonic()
    while True:
        if not asked and not stopping_since:
            _restart_ended(services, children)
        codes = [process.poll() for process in children]
        ending = bool(asked) or any(c is not None for c in codes)
        if ending and not stopping_since:
            first_code = None if asked else next(c for c in codes if c is not None)
            stopping_since.append(time.monotonic())
            # What the services started goes first (app processes end as stopped, not as
            # failed by a vanished SuperLink), then the services themselves.
            processes.stop_started(spare=frozenset(c.pid for c in children), grace=grace / 3)
            signal_all(signal.SIGTERM)
        if all(c is not None for c in codes):
            processes.stop_started()
            return 0 if asked else (first_code or 0)
        if stopping_since and time.monotonic() - stopping_since[0] > grace:
            signal_all(signal.SIGKILL)
        if watch is not None and not stopping_since and time.monotonic() - watched >= every:
            watched = time.monotonic()
            _watch_once(watch)
        time.sleep(0.2)


def _restart_ended(services: list[Service], children: list[subprocess.Popen]) -> None:
    """Start again each restartable service that ended by itself (after its callback)."""
    for index, service in enumerate(services):
        code = children[index].poll()
        if code is not None and service.restart is not None:
            _watch_once(functools.partial(service.restart, code))
            children[index] = service.start()


def _watch_once(watch: Callable[[], None]) -> None:
    try:
        watch()
    except Exception as err:  # a watch must never take the services down with it
        print(f"medfed: warning: {err}", file=sys.stderr)
