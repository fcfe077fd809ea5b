"""`medfed node start`: a hospital's Flower SuperNode, started only on usable data.

It checks the site folder first (the same checks as `medfed data check`),
then runs a SuperNode with TLS (the consortium CA), its authentication key,
and the site's data path, name, device and cache in its node config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from medfed.client.data.check import check_site, print_report
from medfed.shared_models import runtime
from medfed.shared_models.audit import audit
from medfed.shared_models.protocol import NodeConfig


@dataclass(frozen=True)
class NodeOptions:
    """What `medfed node start` was asked to run."""

    coordinator: str  # HOST:PORT of the coordinator's Fleet API
    ca: Path | None  # the consortium CA certificate (None only with insecure)
    key: Path | None  # this hospital's private key for SuperNode authentication
    data: Path  # the site folder
    name: str  # the site's label in reports
    device: str = "auto"
    runtime_port: int = 9094
    state: Path = Path("node-state")
    metrics_port: int | None = None
    task: str | None = None  # the task to check the data for (default: dataset.json)
    insecure: bool = False


def node_config(data: Path, name: str, device: str, cache: Path) -> str:
    """Flower's `--node-config` string; values are quoted as TOML strings."""
    values = {
        NodeConfig.DATA_PATH: str(data),
        NodeConfig.SITE_NAME: name,
        NodeConfig.DEVICE: device,
        NodeConfig.CACHE_DIR: str(cache),
    }
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def supernode_command(
    coordinator: str, ca: Path | None, key: Path | None, config: str, runtime_port: int
) -> list[str]:
    """The flower-supernode command line (TLS with the CA; authenticated with the key)."""
    command = [
        runtime.executable("flower-supernode"),
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


def start_node(options: NodeOptions) -> int:
    """Check the site, then run the SuperNode in the foreground until it stops."""
    if options.ca is None and not options.insecure:
        raise runtime.CredentialsError(
            "no --ca given: a node only connects over TLS (or pass --insecure for a local test)"
        )
    runtime.require_files([(options.ca, "--ca"), (options.key, "--key")])
    report = check_site(options.data, options.task)
    print_report(report)
    if not report["usable"]:
        print("not starting the node: fix the blocking problems above", file=sys.stderr)
        return 1
    ca, key = (None, None) if options.insecure else (options.ca, options.key)
    if options.insecure:
        print(
            "WARNING: --insecure: model updates travel unencrypted and the node is not "
            "authenticated. Never use this outside a local test.",
            file=sys.stderr,
        )
    state, log = options.state, options.state / "audit.jsonl"
    env = runtime.service_env(state, log, (options.metrics_port, "127.0.0.1"))
    config = node_config(options.data.resolve(), options.name, options.device, state / "cache")
    audit(
        "node-started",
        log=log,
        site=options.name,
        coordinator=options.coordinator,
        tls=ca is not None,
        authenticated=key is not None,
    )
    command = supernode_command(options.coordinator, ca, key, config, options.runtime_port)
    code = runtime.supervise(command, env)
    audit("node-stopped", log=log, site=options.name, exit_code=code)
    return code
