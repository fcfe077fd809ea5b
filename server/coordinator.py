"""`medfed coordinator start|pull`: a Flower SuperLink as a consortium runs it.

TLS and SuperNode authentication are on; without certificates it refuses to
start unless --insecure is given (and then says so loudly). The state folder
keeps the SuperLink database, the audit log, every run's output folder and
the metrics files; a long-lived exporter serves the metrics of the
short-lived ServerApp processes at one fixed port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from medfed.server import processes, telemetry
from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY, CredentialsError
from medfed.shared_models.audit import AUDIT_ENV, audit

RUNS_ENV = "MEDFED_RUNS_DIR"


def superlink_command(certs: Path | None, host: str, port: int, state: Path) -> list[str]:
    command = [
        processes.executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-certfile",
        str(certs / SERVER_CERT),
        "--ssl-keyfile",
        str(certs / SERVER_KEY),
        "--ssl-ca-certfile",
        str(certs / CA_CERT),
        "--enable-supernode-auth",
    ]


def supervise(
    command: list[str], env: dict[str, str], log_file: Path | None = None, grace: float = 15.0
) -> int:
    """Run a Flower service in the foreground; SIGINT/SIGTERM stop it (and its children).

    The handler only forwards the signal: waiting on the child inside a signal
    handler would deadlock with the main thread's own wait (subprocess's wait
    lock is not re-entrant). The loop below escalates to SIGKILL after `grace`.
    """
    if log_file is None:
        process = subprocess.Popen(command, env=env, start_new_session=True)
    else:
        process = processes.start(command, log_file, env)
    stop_requested: list[float] = []

    def forward(signum: int, frame: object) -> None:
        stop_requested.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            code = process.wait(timeout=1)
            return 0 if stop_requested else code  # a requested stop is a clean exit
        except subprocess.TimeoutExpired:
            if stop_requested and time.monotonic() - stop_requested[0] > grace:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def start_coordinator(
    certs: Path | None, host: str, port: int, state: Path, metrics_port: int | None, insecure: bool
) -> int:
    if certs is None and not insecure:
        raise CredentialsError(
            "no --certs given: the coordinator only starts with TLS and "
            "SuperNode authentication (or pass --insecure for a local test)"
        )
    if certs is not None:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (certs / name).is_file():
                raise CredentialsError(f"{certs / name} not found (run `medfed certs init`)")
    if insecure:
        certs = None
        print(
            "WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can "
            "reach this port can read model updates and join as a hospital. Never use "
            "this outside a local test.",
            file=sys.stderr,
        )
    state.mkdir(parents=True, exist_ok=True)
    env = processes.flower_env(state / "flwr-home")
    env[AUDIT_ENV] = str(state / "audit.jsonl")
    env[RUNS_ENV] = str(state / "runs")
    if metrics_port is not None:
        metrics_dir = telemetry.prepare_multiprocess_dir(state / "metrics")
        telemetry.serve(metrics_port, metrics_dir, "0.0.0.0" if host != "127.0.0.1" else host)
        env[telemetry.MULTIPROC_ENV] = str(metrics_dir)
    log = state / "audit.jsonl"
    audit(
        "coordinator-started",
        log=log,
        address=f"{host}:{port}",
        tls=certs is not None,
        node_authentication=certs is not None,
    )
    code = supervise(superlink_command(certs, host, port, state), env)
    audit("coordinator-stopped", log=log, exit_code=code)
    return code


def pull_run(state: Path, run_id: str, destination: Path) -> Path:
    """Copy a finished run's folder (global model, metrics, report) out of the state."""
    source = state / "runs" / run_id
    if not (source / "model.json").is_file():
        raise ValueError(f"{source}: no finished run with a global model here")
    if destination.exists():
        raise FileExistsError(f"{destination} exists; refusing to overwrite it")
    shutil.copytree(source, destination)
    return destination


def admit_hospital(certs: Path, name: str, state: Path, connection: str | None) -> str:
    """Register a hospital's public key with the SuperLink and audit the admission.

    Wraps `flwr supernode register`; the audit entry names the hospital and the
    node id Flower assigned, so later per-round participant lists can be traced
    back to a hospital.
    """
    public_key = certs / "hospitals" / name / f"{name}.pub"
    if not public_key.is_file():
        raise CredentialsError(f"{public_key} not found (run `medfed certs add-hospital {name}`)")
    command = [processes.executable("flwr"), "supernode", "register", str(public_key)]
    command += [connection] if connection else []
    command += ["--name", name, "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, env=processes.flower_env(None))
    output = result.stdout[result.stdout.find("{") :] if "{" in result.stdout else ""
    if result.returncode != 0 or not output:
        raise RuntimeError(f"registering {name} failed: {(result.stdout + result.stderr)[-400:]}")
    node_id = str(json.loads(output)["node-id"])
    audit(
        "node-admitted",
        log=state / "audit.jsonl",
        hospital=name,
        node_id=node_id,
        public_key_sha256=hashlib.sha256(public_key.read_bytes()).hexdigest(),
    )
    return node_id
