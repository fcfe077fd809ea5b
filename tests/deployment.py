"""A real consortium on 127.0.0.1, for the deployment test and the round-latency benchmark:
CA and keys, a TLS coordinator behind its proxy, an operator connected with a certificate,
admitted hospitals' nodes, `flwr` runs.

Every process is started here and stopped by pid; ports are chosen free.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import tomli_w

from medfed.shared_models.supervision import executable, flower_env, free_port

REPO = Path(__file__).resolve().parents[1]

Consortium = dict[str, Any]  # what `consortium` yields; tests add their own entries


def medfed(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """One `medfed` command, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", *args],
        capture_output=True,
        text=True,
        **kwargs,
    )


def spawn(
    args: list[str], log: Path, env: dict[str, str], stamped: bool = False
) -> subprocess.Popen:
    """`args` in a session of its own, its output (stderr too) in `log`.

    `stamped`: every line is prefixed with the Unix time it was written at, so
    that a benchmark can line a node's log up with the coordinator's records
    (Flower prints no time at its default log level).
    """
    if not stamped:
        return subprocess.Popen(
            args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    threading.Thread(target=_stamp, args=(process.stdout, log), daemon=True).start()
    return process


def _stamp(output: IO[bytes], log: Path) -> None:
    with log.open("w") as file:
        for line in output:
            file.write(f"{time.time():.3f} {line.decode(errors='replace')}")
            file.flush()


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process group at once, then wait (each one shuts down gracefully)."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def flwr(env: dict[str, str], *args: str) -> dict:
    """`flwr ARGS --format json` as the operator; its JSON answer."""
    result = subprocess.run(
        [executable("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout[result.stdout.index("{") :])


def wait(check: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    """Return once `check()` holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def flwr_home(home: Path, address: str, **connection: str) -> dict[str, str]:
    """An environment for `flwr` whose default connection is `consortium` at `address`."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {"default": "consortium", "consortium": {"address": address, **connection}}
    }
    (home / "config.toml").write_text(tomli_w.dumps(config))
    return flower_env(home)  # also puts Flower's own scripts on PATH


def answers(url: str, ca: Path) -> bool:
    """Whether `url` answers with success over TLS trusting `ca`."""
    try:
        return httpx.get(
            url, verify=ssl.create_default_context(cafile=str(ca)), timeout=1
        ).is_success
    except httpx.HTTPError:
        return False


@contextmanager
def consortium(
    tmp: Path, sites: Path, hospitals: list[str], coordinator_env: Mapping[str, str] | None = None
) -> Iterator[Consortium]:
    """A coordinator behind its proxy, an operator connected with a certificate, each of
    `hospitals`' own key pair, and an outsider holding only the CA certificate;
    `coordinator_env`: more variables in the coordinator's environment."""
    certs = tmp / "certs"
    assert medfed("certs", "init", "--out", str(certs), "--host", "127.0.0.1").returncode == 0
    assert medfed("certs", "add-operator", "ops", "--out", str(certs)).returncode == 0
    for name in hospitals:  # each hospital makes its own key pair, at the hospital
        made = medfed("node", "keygen", name, "--out", str(tmp / "keys" / name))
        assert made.returncode == 0, made.stderr
    port, local = free_port(), free_port()
    env = flower_env(tmp / "operator")
    outsider = flwr_home(
        tmp / "outsider", f"127.0.0.1:{port}", **{"root-certificates": str(certs / "ca.pem")}
    )
    operator = certs / "operators" / "ops"
    processes = [
        spawn(
            [sys.executable, "-m", "medfed.server.cli", "coordinator", "start",
             "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port),
             "--state", str(tmp / "coordinator")],
            tmp / "coordinator.log", {**env, **(coordinator_env or {})},
        ),
        spawn(
            [sys.executable, "-m", "medfed.server.cli", "operator", "connect",
             "--coordinator", f"127.0.0.1:{port}", "--cert", str(operator / "ops.pem"),
             "--key", str(operator / "ops.key"), "--ca", str(operator / "ca.pem"),
             "--port", str(local), "--state", str(tmp / "operator-state")],
            tmp / "operator.log", env,
        ),
    ]  # fmt: skip
    try:
        wait(lambda: answers(f"https://127.0.0.1:{port}/health", certs / "ca.pem"), 60, "proxy")
        wait(lambda: (tmp / "operator" / "config.toml").is_file(), 30, "operator link")
        yield {
            "certs": certs,
            "port": port,
            "env": env,
            "outsider": outsider,
            "tmp": tmp,
            "sites": sites,
            "processes": processes,
        }
    finally:
        stop_all(processes)


def admit(c: Consortium, name: str) -> str:
    """The operator admits hospital `name`'s public key; the node id Flower gave it."""
    admitted = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "coordinator", "admit", name,
         "--public-key", str(c["tmp"] / "keys" / name / f"{name}.pub"),
         "--state", str(c["tmp"] / "coordinator"),
         "--connection", "consortium"],
        capture_output=True, text=True, env=c["env"],
    )  # fmt: skip
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    return admitted.stdout.split()[-1]


def start_node(
    c: Consortium,
    name: str,
    data: Path,
    env: dict[str, str] | None = None,
    stamped: bool = False,
    options: tuple[str, ...] = (),
) -> subprocess.Popen:
    """A hospital's node; it runs only the app package its staff approved.

    `env`: the node's environment (default: the operator's); `stamped`: its log
    lines carry the time they were written (see `spawn`); `options`: more
    `medfed node start` options. Its torch uses one thread unless `env` says
    otherwise: the hospitals share this machine's cores (a simulated site gets
    one CPU from Ray, which sets OMP_NUM_THREADS likewise).
    """
    keys = c["tmp"] / "keys" / name
    approved = medfed("node", "approve", c["app_sha256"], "--state", str(c["tmp"] / name))
    assert approved.returncode == 0, approved.stderr
    node = spawn(
        [sys.executable, "-m", "medfed.server.cli", "node", "start",
         "--coordinator", f"127.0.0.1:{c['port']}", "--ca", str(c["certs"] / "ca.pem"),
         "--key", str(keys / f"{name}.key"), "--data", str(data),
         "--runtime-port", str(free_port()), "--state", str(c["tmp"] / name), *options],
        c["tmp"] / f"{name}.log",
        {"OMP_NUM_THREADS": "1", **(env or c["env"])},
        stamped,
    )  # fmt: skip
    c["processes"].append(node)
    return node


def online(c: Consortium) -> list[str]:
    """Node ids the coordinator sees online."""
    nodes = flwr(c["env"], "supernode", "ls", "consortium")["nodes"]
    return [str(n["node-id"]) for n in nodes if n["status"] == "online"]


def closed_record(c: Consortium, run_id: str) -> dict[str, Any] | None:
    """The coordinator's metrics.json of run `run_id` once the run's record is closed."""
    record = c["tmp"] / "coordinator" / "runs" / str(run_id) / "metrics.json"
    try:
        metrics = json.loads(record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return metrics if metrics["status"] not in ("running", "starting") else None


def run(c: Consortium, config: str, app: Path = REPO, timeout: float = 400) -> str:
    """`flwr run app` with `config`; its run id once Flower says it finished.

    It waits on the run's record first, then asks Flower: a `flwr` process every
    second would take CPU from the federation it waits for, on a 2-core machine.
    """
    started = flwr(c["env"], "run", str(app), "consortium", "--run-config", config)
    assert "run-id" in started, started
    run_id = started["run-id"]

    def finished() -> bool:
        listed = flwr(c["env"], "ls", "consortium", "--run-id", run_id)["runs"][0]
        return listed["status"].startswith("finished")

    wait(lambda: closed_record(c, run_id) is not None, timeout, f"run {run_id}'s record")
    wait(finished, 60, f"run {run_id}")
    return run_id


def package_sha256(app: Path, work: Path) -> str:
    """The SHA-256 of the app package `flwr run app` submits (what hospitals approve)."""
    work.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([executable("flwr"), "build", "--app", str(app)], cwd=work,
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    return hashlib.sha256(next(work.glob("*.fab")).read_bytes()).hexdigest()


def tree(root: int) -> set[int]:
    """`root` and every live descendant (Flower's detached services and app processes too)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found = {root}
    while below := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= below
    return found & set(parents)
