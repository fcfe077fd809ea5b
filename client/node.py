"""`medfed node start`: a hospital's Flower SuperNode, started only on usable data.

It checks the site folder first (the same checks as `medfed data check`),
then runs a SuperNode with TLS (the consortium CA), its authentication key,
and the site's data path, name, device and cache in its node config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medfed.client.data.check import check_site, print_report
from medfed.server import processes, telemetry
from medfed.server.coordinator import supervise
from medfed.shared_models.audit import AUDIT_ENV, audit


def node_config(data: Path, name: str, device: str, cache: Path) -> str:
    """Flower's `--node-config` string; values are quoted as TOML strings."""
    values = {"data-path": str(data), "site-name": name, "device": device, "cache-dir": str(cache)}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def supernode_command(
    coordinator: str, ca: Path | None, key: Path | None, config: str, runtime_port: int
) -> list[str]:
    command = [
        processes.executable("flower-supernode"),
        "--superlink",
        coordinator,
        "--node-config",
        config,
        "--port",
        str(runtime_port),
        "--isolation",
        "subprocess",
    ]
    if ca is None:
        return [*command, "--insecure"]
    command += ["--root-certificates", str(ca)]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return command


def start_node(
    coordinator: str,
    ca: Path | None,
    key: Path | None,
    data: Path,
    name: str,
    device: str,
    runtime_port: int,
    state: Path,
    metrics_port: int | None,
    task: str | None,
    insecure: bool,
) -> int:
    if ca is None and not insecure:
        raise ValueError(
            "no --ca given: a node only connects over TLS (or pass --insecure for a local test)"
        )
    for path, flag in ((ca, "--ca"), (key, "--key")):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: file not found")
    report = check_site(data, task)
    print_report(report)
    if not report["usable"]:
        print("not starting the node: fix the blocking problems above", file=sys.stderr)
        return 1
    if insecure:
        ca, key = None, None
        print(
            "WARNING: --insecure: model updates travel unencrypted and the node is not "
            "authenticated. Never use this outside a local test.",
            file=sys.stderr,
        )
    state.mkdir(parents=True, exist_ok=True)
    env = processes.flower_env(state / "flwr-home")
    env[AUDIT_ENV] = str(state / "audit.jsonl")
    if metrics_port is not None:
        metrics_dir = telemetry.prepare_multiprocess_dir(state / "metrics")
        telemetry.serve(metrics_port, metrics_dir)
        env[telemetry.MULTIPROC_ENV] = str(metrics_dir)
    config = node_config(data.resolve(), name, device, state / "cache")
    log = state / "audit.jsonl"
    audit(
        "node-started",
        log=log,
        site=name,
        coordinator=coordinator,
        tls=ca is not None,
        authenticated=key is not None,
    )
    code = supervise(supernode_command(coordinator, ca, key, config, runtime_port), env)
    audit("node-stopped", log=log, site=name, exit_code=code)
    return code
