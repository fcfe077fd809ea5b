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

from medfed.client import app_runner, approval, warm_worker
from medfed.client.data.check import check_site, print_report
from medfed.client.settings import NodeConfigError, NodeSettings
from medfed.shared_models import credentials, supervision
from medfed.shared_models.audit import audit
from medfed.shared_models.flower_pin import FLOWER_PULLS_ENV
from medfed.shared_models.protocol import NodeConfig

MAX_PORT = 65535
# How often the node's SuperExec asks its SuperNode for a ClientApp task to start. Flower
# reads it from the environment (flwr/supercore/superexec/run_superexec.py, 0.01..60 s);
# medfed's SuperExec polls faster while a run is active (client/supernode_runner.py).
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
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
    warm: bool = True  # ClientApp processes forked from a warm worker (False: Flower's own)
    flower_waits: bool = False  # keep Flower's fixed 3 s / 0.5 s waits (client/supernode_runner)


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
    coordinator: str,
    ca: Path | None,
    key: Path | None,
    config: str,
    runtime_port: int,
    flower_waits: bool = False,
) -> list[str]:
    """The flower-supernode command line (TLS with the CA; authenticated with the key), run
    by medfed's SuperNode process (client/supernode_runner.py: its waits shortened) unless
    Flower's own waits are asked for."""
    program = [supervision.executable("flower-supernode")]
    if not flower_waits:
        program = [sys.executable, "-m", "medfed.client.supernode_runner"]
    command = [
        *program,
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


def _put_first_on_path(env: dict[str, str], state: Path, programs: dict[str, str]) -> None:
    """Scripts named as Flower's programs (name -> `module:function` of medfed's) in the
    node state's bin/, first on the PATH the SuperNode starts them from."""
    folder = state / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in programs.items():
        module, function = target.split(":")
        script = folder / name
        script.write_text(f"#!{sys.executable}\nfrom {module} import {function}\n\n{function}()\n")
        script.chmod(0o755)
    if not env["PATH"].startswith(f"{folder}{os.pathsep}"):
        env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"


def _run_only_approved_apps(env: dict[str, str], state: Path, site: str) -> None:
    """Put medfed's approving `flwr-clientapp` first on the SuperNode's PATH."""
    _put_first_on_path(env, state, {"flwr-clientapp": "medfed.client.app_runner:main"})
    env[approval.STATE_ENV] = str(state.resolve())
    env[approval.SITE_ENV] = site
    count = len(approval.approved(state))
    print(
        f"{count} app package(s) approved at this node"
        + ("" if count else ": every run is refused until `medfed node approve HASH`")
    )


def _start_app_processes_promptly(env: dict[str, str], state: Path) -> None:
    """Have the SuperExec look for a new ClientApp task every 0.1 s while a run is active
    instead of Flower's fixed 1 s, and every 1 s when idle.

    Every message of a round waits for that poll before its ClientApp process
    starts: about 0.5 s at Flower's default (docs/benchmarks.md). A fixed
    0.1 s cost an idle node 3 % of one core instead of 0.6 %; medfed's
    `flower-superexec`, first on the SuperNode's PATH, shortens it only while
    active (client/supernode_runner.py). An operator's own setting in the
    environment is kept as the idle interval.
    """
    _put_first_on_path(
        env, state, {"flower-superexec": "medfed.client.supernode_runner:superexec_main"}
    )


def _worker_service(env: dict[str, str], state: Path, log: Path, site: str) -> supervision.Service:
    """The warm worker ClientApp processes are forked from; restarted if it ends (meanwhile
    a message runs cold, in a process of its own, as Flower starts it)."""
    env[app_runner.SOCKET_ENV] = str(warm_worker.socket_path(state.resolve()))

    def restarted(code: int) -> None:
        print(f"medfed: the warm worker ended (exit code {code}); restarting it", file=sys.stderr)
        audit("worker-restarted", log=log, site=site, exit_code=code)

    command = [sys.executable, "-m", "medfed.client.warm_worker", str(state.resolve())]
    return supervision.Service(command, dict(env), restart=restarted)


def start_node(options: NodeOptions) -> int:
    """Check the site, then run the SuperNode in the foreground until it stops."""
    if options.ca is None and not options.insecure:
        raise credentials.CredentialsError(
            "no --ca given: a node only connects over TLS (or pass --insecure for a local test)"
        )
    credentials.require_files([(options.ca, "--ca"), (options.key, "--key")])
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
    env = supervision.service_env(state, log, (options.metrics_port, options.metrics_host))
    _run_only_approved_apps(env, state, options.name)
    if options.flower_waits:
        env[FLOWER_PULLS_ENV] = "1"  # the ClientApp's object pulls too
    else:
        _start_app_processes_promptly(env, state)
    audit(
        "node-started",
        log=log,
        site=options.name,
        coordinator=options.coordinator,
        tls=ca is not None,
        authenticated=key is not None,
    )
    services = []
    if options.warm:
        services.append(_worker_service(env, state, log, options.name))
    command = supernode_command(
        options.coordinator,
        ca,
        key,
        config,
        options.runtime_port,
        flower_waits=options.flower_waits,
    )
    services.append(supervision.Service(command, env))
    code = supervision.supervise(services)
    audit("node-stopped", log=log, site=options.name, exit_code=code)
    return code
