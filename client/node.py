"""`medfed node start`: a hospital's Flower SuperNode, started only on usable data.

It checks the site folder first (the same checks as `medfed data check`),
then runs a SuperNode with TLS (the consortium CA), its authentication key,
and the site's data path, name, device, cache and privacy floor in its node
config. Its ClientApp processes run only app packages this hospital approved
(client/approval.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from medfed.client import approval
from medfed.client.data.check import check_site, print_report
from medfed.client.node_settings import NodeConfigError, NodeSettings
from medfed.shared_models import runtime
from medfed.shared_models.audit import audit
from medfed.shared_models.protocol import NodeConfig

MAX_PORT = 65535
# How often the node's SuperExec asks its SuperNode for a ClientApp task to start. Flower
# reads it from the environment (flwr/supercore/superexec/run_superexec.py, 0.01..60 s).
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_SECONDS = "0.1"
# The `medfed node start` option behind each node-config key it sets.
OPTIONS = {
    NodeConfig.DATA_PATH: "--data",
    NodeConfig.SITE_NAME: "--name",
    NodeConfig.DEVICE: "--device",
    NodeConfig.CACHE_DIR: "--state",
    NodeConfig.MIN_COUNT: "--min-count",
    NodeConfig.REQUIRE_SECURE_AGGREGATION: "--require-secure-aggregation",
}


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
    metrics_host: str = "127.0.0.1"  # the metrics stay on this host unless told otherwise
    task: str | None = None  # the task to check the data for (default: dataset.json)
    insecure: bool = False
    min_count: int = 10  # the site's floor: no smaller count of images is ever revealed
    require_secure_aggregation: bool = False  # train only in runs with secure aggregation


def node_config_values(options: NodeOptions, cache: Path) -> dict[str, str | int | bool]:
    """The node config the SuperNode is started with, checked by the rules its ClientApp
    reads it with (NodeSettings): a bad option fails here, before anything starts."""
    values: dict[str, str | int | bool] = {
        NodeConfig.DATA_PATH: str(options.data.resolve()),
        NodeConfig.SITE_NAME: options.name,
        NodeConfig.DEVICE: options.device,
        NodeConfig.CACHE_DIR: str(cache),
        NodeConfig.MIN_COUNT: options.min_count,
        NodeConfig.REQUIRE_SECURE_AGGREGATION: options.require_secure_aggregation,
    }
    for key, value in values.items():
        try:
            NodeSettings.from_mapping({key: value})
        except NodeConfigError as err:
            raise NodeConfigError(f"{OPTIONS[key]}: {err}") from None
    return values


def node_config(options: NodeOptions, cache: Path) -> str:
    """Flower's `--node-config` string; values are quoted as TOML values."""
    values = node_config_values(options, cache)
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


def _run_only_approved_apps(env: dict[str, str], state: Path, site: str) -> None:
    """Put medfed's approving `flwr-clientapp` first on the SuperNode's PATH."""
    runner = state / "bin" / "flwr-clientapp"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text(f"#!{sys.executable}\nfrom medfed.client.app_runner import main\n\nmain()\n")
    runner.chmod(0o755)
    env["PATH"] = f"{runner.parent}{os.pathsep}{env['PATH']}"
    env[approval.STATE_ENV] = str(state.resolve())
    env[approval.SITE_ENV] = site
    count = len(approval.approved(state))
    print(
        f"{count} app package(s) approved at this node"
        + ("" if count else ": every run is refused until `medfed node approve HASH`")
    )


def _start_app_processes_promptly(env: dict[str, str]) -> None:
    """Have the SuperExec look for a new ClientApp task every 0.1 s instead of Flower's 1 s.

    Every message of a round (two in a plain round, three in a secure one)
    waits for that poll before its ClientApp process starts: about 0.5 s at
    Flower's default, which the deployed-round benchmark measured
    (docs/benchmarks.md). The price is an idle node's CPU: 3 % of one core
    instead of 0.6 %. Flower's other waits between messages are fixed. An
    operator's own setting in the environment is kept.
    """
    env.setdefault(TASK_POLL_ENV, TASK_POLL_SECONDS)


def start_node(options: NodeOptions) -> int:
    """Check the site, then run the SuperNode in the foreground until it stops."""
    if options.ca is None and not options.insecure:
        raise runtime.CredentialsError(
            "no --ca given: a node only connects over TLS (or pass --insecure for a local test)"
        )
    runtime.require_files([(options.ca, "--ca"), (options.key, "--key")])
    config = node_config(options, options.state / "cache")
    if not 1 <= options.runtime_port <= MAX_PORT:
        raise NodeConfigError(f"--runtime-port {options.runtime_port}: expected 1..{MAX_PORT}")
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
    env = runtime.service_env(state, log, (options.metrics_port, options.metrics_host))
    _run_only_approved_apps(env, state, options.name)
    _start_app_processes_promptly(env)
    audit(
        "node-started",
        log=log,
        site=options.name,
        coordinator=options.coordinator,
        tls=ca is not None,
        authenticated=key is not None,
    )
    command = supernode_command(options.coordinator, ca, key, config, options.runtime_port)
    code = runtime.supervise([runtime.Service(command, env)])
    audit("node-stopped", log=log, site=options.name, exit_code=code)
    return code
