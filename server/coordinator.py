"""`medfed coordinator start|pull`: a Flower SuperLink as a consortium runs it.

TLS and SuperNode authentication are on; without certificates it refuses to
start unless --insecure is given (and then says so loudly). The state folder
keeps the SuperLink database, the audit log, every run's output folder and
the metrics files; a long-lived exporter serves the metrics of the
short-lived ServerApp processes at one fixed port.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from medfed.shared_models import runtime
from medfed.shared_models.audit import audit
from medfed.shared_models.run_folder import MODEL_JSON, RUNS_DIR_ENV
from medfed.shared_models.runtime import CredentialsError


@dataclass(frozen=True)
class CoordinatorOptions:
    """What `medfed coordinator start` was asked to run."""

    certs: Path | None  # folder from `medfed certs init` (None only with insecure)
    host: str = "0.0.0.0"
    port: int = 9092
    state: Path = Path("coordinator-state")
    metrics_port: int | None = None
    insecure: bool = False


def superlink_command(certs: Path | None, host: str, port: int, state: Path) -> list[str]:
    """The flower-superlink command line (TLS and SuperNode authentication with `certs`)."""
    command = [
        runtime.executable("flower-superlink"),
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


def start_coordinator(options: CoordinatorOptions) -> int:
    """Run the SuperLink in the foreground until it stops; audit start and stop."""
    certs = options.certs
    if certs is None and not options.insecure:
        raise CredentialsError(
            "no --certs given: the coordinator only starts with TLS and "
            "SuperNode authentication (or pass --insecure for a local test)"
        )
    if certs is not None:
        runtime.require_files(
            ((certs / name, "--certs") for name in (CA_CERT, SERVER_CERT, SERVER_KEY)),
            advice=" (run `medfed certs init`)",
        )
    if options.insecure:
        certs = None
        print(
            "WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can "
            "reach this port can read model updates and join as a hospital. Never use "
            "this outside a local test.",
            file=sys.stderr,
        )
    state, log = options.state, options.state / "audit.jsonl"
    metrics_host = "0.0.0.0" if options.host != "127.0.0.1" else options.host
    env = runtime.service_env(state, log, (options.metrics_port, metrics_host))
    env[RUNS_DIR_ENV] = str(state / "runs")
    audit(
        "coordinator-started",
        log=log,
        address=f"{options.host}:{options.port}",
        tls=certs is not None,
        node_authentication=certs is not None,
    )
    code = runtime.supervise(superlink_command(certs, options.host, options.port, state), env)
    audit("coordinator-stopped", log=log, exit_code=code)
    return code


def pull_run(state: Path, run_id: str, destination: Path) -> Path:
    """Copy a finished run's folder (global model, metrics, report) out of the state."""
    source = state / "runs" / run_id
    if not (source / MODEL_JSON).is_file():
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
    command = [runtime.executable("flwr"), "supernode", "register", str(public_key)]
    command += [connection] if connection else []
    command += ["--name", name, "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, env=runtime.flower_env(None))
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
