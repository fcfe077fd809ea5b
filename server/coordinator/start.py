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
from dataclasses import dataclass, field
from pathlib import Path

from medfed.server.coordinator import proxy
from medfed.server.coordinator.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from medfed.server.run import run_status
from medfed.shared_models import credentials, supervision
from medfed.shared_models.audit import audit
from medfed.shared_models.credentials import CredentialsError
from medfed.shared_models.run_folder import METRICS_JSON, RUNS_DIR_ENV, WRITER_LOCK, read_metrics


@dataclass(frozen=True)
class CoordinatorOptions:
    """What `medfed coordinator start` was asked to run."""

    certs: Path | None  # folder from `medfed certs init` (None only with insecure)
    host: str = "0.0.0.0"
    port: int = 9092
    state: Path = Path("coordinator-state")
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the metrics stay on this host unless told otherwise
    insecure: bool = False
    limits: proxy.Limits = field(default_factory=proxy.Limits)  # the proxy's request bounds


def superlink_command(certs: Path | None, host: str, port: int, state: Path) -> list[str]:
    """The flower-superlink command line (TLS and SuperNode authentication with `certs`)."""
    command = [
        supervision.executable("flower-superlink"),
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
    """Run the SuperLink (on loopback) and its proxy in the foreground; audit start and stop.

    With certificates, the SuperLink listens on 127.0.0.1 only and nginx, on
    the public address, lets hospitals reach the Fleet API and operators the
    Control API, every request within `options.limits` (server/coordinator/proxy.py). With
    --insecure (local tests), the SuperLink itself listens on the given address,
    open to anyone who reaches it, unbounded.
    """
    certs = None if options.insecure else _checked_certs(options.certs)
    if certs is None:
        print(
            "WARNING: --insecure: no TLS, no SuperNode authentication and no operator "
            "check. Anyone who can reach this port can read model updates, join as a "
            "hospital and start runs. Never use this outside a local test.",
            file=sys.stderr,
        )
    state, log = options.state, options.state / "audit.jsonl"
    env = supervision.service_env(state, log, (options.metrics_port, options.metrics_host))
    env[RUNS_DIR_ENV] = str(state / "runs")
    services = _services(options, certs, env)
    audit(
        "coordinator-started",
        log=log,
        address=f"{options.host}:{options.port}",
        tls=certs is not None,
        node_authentication=certs is not None,
        control="operators' client certificates" if certs is not None else "open",
    )
    scheme = "https" if certs is not None else "http (insecure)"
    print(f"coordinator: hospitals and operators reach {scheme} {options.host}:{options.port}; "
          f"audit log {log}; Ctrl-C stops it", flush=True)  # fmt: skip
    runs = state / "runs"
    run_status.close_orphaned(_run_dirs(runs), "failed", run_status.DIED, log)

    def watch() -> None:
        run_status.close_orphaned(_run_dirs(runs), "failed", run_status.DIED, log)

    code = supervision.supervise(services, watch=watch)
    if code == 0:
        status, reason = "interrupted", "the coordinator was stopped while the run was going on"
    else:
        status, reason = "failed", f"the coordinator's SuperLink or proxy ended (code {code})"
    reason += "; carry it on with resume-from"
    run_status.close_orphaned(_run_dirs(runs), status, reason, log)
    audit("coordinator-stopped", log=log, exit_code=code)
    return code


def _run_dirs(runs: Path) -> list[Path]:
    return sorted(runs.iterdir()) if runs.is_dir() else []


def _checked_certs(certs: Path | None) -> Path:
    if certs is None:
        raise CredentialsError(
            "no --certs given: the coordinator only starts with TLS and "
            "SuperNode authentication (or pass --insecure for a local test)"
        )
    credentials.require_files(
        ((certs / name, "--certs") for name in (CA_CERT, SERVER_CERT, SERVER_KEY)),
        advice=" (run `medfed certs init`)",
    )
    return certs


def _services(
    options: CoordinatorOptions, certs: Path | None, env: dict[str, str]
) -> list[supervision.Service]:
    """The SuperLink, and with certificates the proxy in front of it."""
    state = options.state
    if certs is None:
        command = superlink_command(None, options.host, options.port, state)
        return [supervision.Service(command, env)]
    nginx = proxy.nginx_executable()  # before anything starts: one line if it is missing
    internal, folder, tls = (
        supervision.free_port(),
        (state / "proxy").resolve(),
        certs.resolve(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    door = proxy.FrontDoor(
        (options.host, options.port),
        (tls / SERVER_CERT, tls / SERVER_KEY, tls / CA_CERT),
        proxy.Upstream(internal, tls / CA_CERT),
        folder,
        options.limits,
    )
    conf = folder / "nginx.conf"
    conf.write_text(proxy.nginx_conf(door, proxy.worker_user(state)))
    return [
        supervision.Service(superlink_command(certs, "127.0.0.1", internal, state), env),
        supervision.Service(proxy.nginx_command(conf, nginx), env, state / "proxy.log"),
    ]


def pull_run(state: Path, run_id: str, destination: Path) -> Path:
    """Copy a run's folder (metrics, report, checkpoints, the global model when it finished)
    out of the state: completed, failed or interrupted, never one still going. Reads only:
    closing a dead run's record is the coordinator's job."""
    source = state / "runs" / run_id
    record = read_metrics(source) if source.is_dir() else None
    if record is None:
        raise ValueError(f"{source}: no run here (no {METRICS_JSON})")
    orphaned = record.get("status") == "running" and run_status.is_orphaned(source)
    if record.get("status") == "running" and not orphaned:
        raise ValueError(f"run {run_id} is still running; pull it once it has finished")
    if destination.exists():
        raise FileExistsError(f"{destination} exists; refusing to overwrite it")
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(WRITER_LOCK))
    if orphaned:  # the copy tells the truth; the coordinator closes the run itself
        copied = run_status.closed_record(record, "failed", run_status.DIED)
        (destination / METRICS_JSON).write_text(json.dumps(copied, indent=2, allow_nan=True))
    return destination


def admit_hospital(public_key: Path, name: str, state: Path, connection: str | None) -> str:
    """Register a hospital's public key (made at the hospital) and audit the admission.

    Wraps `flwr supernode register`; the audit entry names the hospital and the
    node id Flower assigned, so later per-round participant lists can be traced
    back to a hospital. Only the public key is ever on this machine.
    """
    if not public_key.is_file():
        raise CredentialsError(
            f"--public-key {public_key}: file not found (the hospital makes it with "
            f"`medfed node keygen {name}`)"
        )
    if b"PRIVATE KEY" in public_key.read_bytes():
        raise CredentialsError(
            f"--public-key {public_key} is a private key: only the hospital may hold it; "
            "ask it for its .pub file"
        )
    command = [supervision.executable("flwr"), "supernode", "register", str(public_key)]
    command += [connection] if connection else []
    command += ["--name", name, "--format", "json"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=supervision.flower_env(None)
    )
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
