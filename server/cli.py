"""The `medfed` command line: one entry point for hospitals, operators and researchers.

This module and the simulation launcher are the only coordinator modules that
import the hospital side: the command line wires both roles together. User
errors (bad config, bad data, missing credentials) print one line naming the
key, file or value and exit 2; only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.client.hospital_commands import (
    Commands,
    add_data_commands,
    add_export_command,
    add_gan_commands,
    add_node_commands,
    add_predict_command,
    command_group,
)
from medfed.server.coordinator.proxy import Limits
from medfed.shared_models.command_options import add_metrics_arguments

if TYPE_CHECKING:
    from medfed.client.data.site_declarations import SiteDeclarations

STARTED = time.monotonic()  # the command's start: `done in` times the whole command


def build_parser() -> argparse.ArgumentParser:
    """Every `medfed` command, with its options."""
    parser = argparse.ArgumentParser(prog="medfed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_data_commands(commands)
    add_gan_commands(commands)
    add_predict_command(commands)
    add_export_command(commands)
    _add_simulate(commands)
    _add_bench(commands)
    _add_certs_commands(commands)
    _add_coordinator_commands(commands)
    _add_operator_commands(commands)
    add_node_commands(commands)
    return parser


def _add_simulate(commands: Commands) -> None:
    sim = commands.add_parser("simulate", help="run a whole federation on this machine")
    sim.add_argument(
        "--task",
        help="segmentation | segmentation3d | classification | regression | gan "
        "(default: the one every --data site's dataset.json names, else segmentation)",
    )
    sim.add_argument("--model", help="network, e.g. unet, smallcnn, densenet121")
    sim.add_argument(
        "--sites",
        type=int,
        help="number of hospitals (default 3, or all site folders under --data)",
    )
    sim.add_argument("--rounds", type=int, help="federated rounds (num-server-rounds)")
    sim.add_argument(
        "--strategy", help="fedavg, fedprox, fedadam, fedmedian, krum, ... (docs/researcher.md)"
    )
    sim.add_argument("--data", type=Path, help="folder of site folders; default: synthetic")
    sim.add_argument("--out", type=Path, help="output folder (default runs/<time>-<task>)")
    sim.add_argument("--seed", type=int)
    sim.add_argument(
        "--images-per-site",
        type=int,
        help="synthetic data only: mean images per hospital (default 60; 24 for 3D)",
    )
    sim.add_argument(
        "--cpus-per-site",
        type=int,
        default=1,
        help="CPU cores reserved per simulated hospital (sets concurrency)",
    )
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the hospitals as actors on this existing Ray cluster ('auto': RAY_ADDRESS, "
        "else the last `ray start` here; default 'local': a private Ray, stopped with the run)",
    )
    _add_simulate_settings(sim)
    sim.set_defaults(handler=_simulate)


def _add_simulate_settings(sim: argparse.ArgumentParser) -> None:
    """Where a simulation's settings come from, and what it shows while it runs."""
    sim.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any [tool.flwr.app.config] key, e.g. -c lr=0.001 (repeatable)",
    )
    sim.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="run settings: a pyproject.toml ([tool.flwr.app.config]) or a TOML of keys "
        "(default: ./pyproject.toml when it is medfed's; -c and flags win over it)",
    )
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="carry on an interrupted or failed run from its last completed round "
        "(its own settings; --rounds and -c may change the rounds and waits)",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's full log")
    add_metrics_arguments(sim)  # the whole simulated federation's metrics
    sim.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep serving metrics this long after the run (a last scrape)",
    )


def _add_bench(commands: Commands) -> None:
    bench = command_group(commands, "bench", "measure medfed against its baselines")
    quality = bench.add_parser(
        "quality", help="pooled vs local vs federated (FedAvg, FedProx, FedAdam, FedBN, secure)"
    )
    quality.add_argument("--task", help="segmentation | segmentation3d | classification | "
                         "regression (with --data, default: the sites' dataset.json)")  # fmt: skip
    quality.add_argument("--sites", type=int, default=3, help="hospitals (default 3)")
    quality.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    quality.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    quality.add_argument("--data", type=Path, help="folder of site folders; default: synthetic")
    quality.add_argument("--images-per-site", type=int, help="synthetic data only")
    quality.add_argument("--methods", help="comma-separated subset (default: all)")
    quality.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    quality.add_argument(
        "--run-config", "-c", action="append", default=[], metavar="KEY=VALUE",
        help="a run-config key every method shares, e.g. -c local-epochs=1 (repeatable)",
    )  # fmt: skip
    quality.set_defaults(handler=_bench_quality)


def _bench_quality(args: argparse.Namespace) -> int:
    from medfed.client.data.site_paths import site_folders
    from medfed.client.local_training import train_and_evaluate
    from medfed.client.synthetic import generate_federation
    from medfed.server.bench.quality import METHODS, Hospitals, QualityBench, run_bench

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bench = QualityBench(
        task=args.task,
        out=args.out,
        sites=args.sites,
        rounds=args.rounds,
        seeds=args.seeds,
        data=args.data,
        images_per_site=args.images_per_site,
        methods=methods,
        overrides=_overrides(args.run_config),
    )
    return run_bench(bench, Hospitals(generate_federation, site_folders, train_and_evaluate))


def _overrides(items: list[str]) -> dict[str, object]:
    """-c KEY=VALUE items as run-config overrides."""
    from medfed.shared_models.config import ConfigError

    overrides: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--run-config {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return overrides


def _add_certs_commands(commands: Commands) -> None:
    certs_commands = command_group(commands, "certs", "consortium CA and TLS certificate")
    init = certs_commands.add_parser("init", help="create the CA and coordinator certificate")
    init.add_argument("--out", type=Path, default=Path("certs"))
    init.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address hospitals use to reach the coordinator "
        "(repeatable; 127.0.0.1 and localhost are always added)",
    )
    init.set_defaults(handler=_certs_init)
    operator = certs_commands.add_parser(
        "add-operator", help="an operator's client certificate (the Control API needs one)"
    )
    operator.add_argument("name")
    operator.add_argument("--out", type=Path, default=Path("certs"))
    operator.set_defaults(handler=_certs_add_operator)


def _add_operator_commands(commands: Commands) -> None:
    operator_commands = command_group(commands, "operator", "an operator's own machine")
    connect = operator_commands.add_parser(
        "connect", help="let flwr reach the coordinator's Control API with your certificate"
    )
    connect.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    connect.add_argument("--cert", type=Path, required=True, help="NAME.pem from add-operator")
    connect.add_argument("--key", type=Path, required=True, help="NAME.key from add-operator")
    connect.add_argument("--ca", type=Path, required=True, help="the consortium CA certificate")
    connect.add_argument("--port", type=int, default=9093, help="the local port flwr uses")
    connect.add_argument("--connection", default="consortium", help="Flower connection name")
    connect.add_argument("--state", type=Path, default=Path("operator-state"))
    connect.set_defaults(handler=_operator_connect)
    start = operator_commands.add_parser(
        "run",
        help="flwr run, its config checked first; exit 0 only for a completed run",
    )
    start.add_argument("app", type=Path, nargs="?", default=Path("."), help="the app folder")
    start.add_argument("--connection", default="consortium", help="Flower connection name")
    start.add_argument("--run-config", default="", help='"key=value key=value", as flwr run')
    start.set_defaults(handler=_operator_run)


def _add_coordinator_commands(commands: Commands) -> None:
    coordinator_commands = command_group(
        commands, "coordinator", "run the consortium's coordinator"
    )
    start = coordinator_commands.add_parser("start", help="SuperLink with TLS and node auth")
    start.add_argument("--certs", type=Path, help="folder from `medfed certs init`")
    start.add_argument("--host", default="0.0.0.0")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument("--state", type=Path, default=Path("coordinator-state"))
    add_metrics_arguments(start)
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication: local tests only"
    )
    _add_limit_arguments(start)
    start.set_defaults(handler=_coordinator_start)
    admit = coordinator_commands.add_parser(
        "admit", help="register a hospital's public key (flwr supernode register) and audit it"
    )
    admit.add_argument("name")
    admit.add_argument(
        "--public-key", type=Path, required=True, help="NAME.pub from `medfed node keygen`"
    )
    admit.add_argument("--state", type=Path, default=Path("coordinator-state"))
    admit.add_argument(
        "--connection",
        default="consortium",
        help="Flower connection name (default consortium, as `medfed operator connect` makes)",
    )
    admit.set_defaults(handler=_coordinator_admit)
    pull = coordinator_commands.add_parser(
        "pull", help="copy a run's folder out (completed, failed or interrupted)"
    )
    pull.add_argument("run_id")
    pull.add_argument("--state", type=Path, default=Path("coordinator-state"))
    pull.add_argument("--to", type=Path, required=True)
    pull.set_defaults(handler=_coordinator_pull)


def _add_limit_arguments(start: argparse.ArgumentParser) -> None:
    """The proxy's request bounds (server/coordinator/proxy.py, docs/operator.md "Limits")."""
    limits = start.add_argument_group("request limits at the proxy")
    defaults = Limits()
    for flag, what in (
        ("--fleet-body-mib", "largest Fleet request body in MiB (hospitals' uploads)"),
        ("--control-body-mib", "largest Control request body in MiB (operators' app packages)"),
        ("--connections-per-client", "open requests at once from one client address"),
        ("--requests-per-second", "sustained requests per client address (bursts of twice)"),
    ):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        limits.add_argument(
            flag, type=_positive, default=default, help=f"{what} (default {default})"
        )


def _positive(text: str) -> int:
    """A whole number of at least 1 (argparse names the flag when it is not)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _certs_init(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.certificates import init_consortium

    for path in init_consortium(args.out, args.host):
        print(f"wrote {path}")
    print(
        f"next: give each hospital {args.out / 'ca.pem'}; it makes its own key pair with "
        "`medfed node keygen NAME` and sends you NAME.pub to admit"
    )
    return 0


def _certs_add_operator(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.certificates import add_operator

    folder = add_operator(args.out, args.name)
    print(
        f"wrote {folder}: give it to the operator, who connects with `medfed operator connect "
        f"--coordinator HOST:PORT --cert {args.name}.pem --key {args.name}.key --ca ca.pem`"
    )
    return 0


def _operator_connect(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.operator_link import OperatorOptions, connect
    from medfed.shared_models.command_options import options_from

    return connect(options_from(OperatorOptions, args))


def _operator_run(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.operator_run import RunOptions, run
    from medfed.shared_models.command_options import options_from

    return run(options_from(RunOptions, args))


def _coordinator_start(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.start import CoordinatorOptions, start_coordinator
    from medfed.shared_models.command_options import options_from

    limits = options_from(Limits, args)
    return start_coordinator(options_from(CoordinatorOptions, args, limits=limits))


def _coordinator_admit(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.start import admit_hospital

    node_id = admit_hospital(args.public_key, args.name, args.state, args.connection)
    print(f"admitted {args.name} as node {node_id}")
    return 0


def _coordinator_pull(args: argparse.Namespace) -> int:
    from medfed.server.coordinator.start import pull_run

    print(f"copied run {args.run_id} to {pull_run(args.state, args.run_id, args.to)}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from medfed.server.simulation.ray_cluster import LOCAL
    from medfed.server.simulation.simulate import Simulation, find_sites, run
    from medfed.shared_models.command_options import options_from
    from medfed.shared_models.config import ConfigError

    overrides = _overrides(args.run_config)
    for flag, key in (
        ("task", "task"),
        ("model", "model"),
        ("rounds", "num-server-rounds"),
        ("strategy", "strategy"),
        ("seed", "seed"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.resume is not None:
        from medfed.server.simulation.simulate import resumed

        fixed = [f"--{name}" for name in ("out", "data", "sites", "config") if getattr(args, name)]
        if fixed:
            raise ConfigError(
                f"--resume carries a run on with its own settings, data and folder: "
                f"{', '.join(fixed)} cannot be given with it (only --rounds, -c for the rounds "
                "and waits, and where it runs)"
            )

        sim = resumed(args.resume.expanduser().resolve(), overrides)
        extras = ("verbose", "metrics_port", "metrics_host", "metrics_linger")
        changed = {name: getattr(args, name) for name in extras} | {"started": STARTED}
        if args.ray_address is not None:  # the cluster moved, or `local` to run here
            changed["ray_address"] = args.ray_address
        return run(replace(sim, **changed))
    overrides, data, out = _with_settings_file(args, overrides)
    found = find_sites(data.expanduser().resolve()) if data else None  # listed when needed
    sites = args.sites
    if sites is None:
        sites = len(found.folders) if found else 3
    out = out or default_out(overrides, found, sites)
    ray_address = args.ray_address or LOCAL
    return run(
        options_from(
            Simulation,
            args,
            overrides=overrides,
            sites=sites,
            out=out,
            data=data,
            ray_address=ray_address,
            started=STARTED,
            found=found,
        )
    )


def _with_settings_file(
    args: argparse.Namespace, overrides: dict[str, object]
) -> tuple[dict[str, object], Path | None, Path | None]:
    """The run's settings with those of its settings file under them (--config, else the
    current folder's pyproject.toml when it is medfed's), and its --data and --out (a
    file's `data-root` and `out-dir` where the command names none)."""
    from medfed.server.simulation.settings_file import default_settings_file, file_settings

    path = args.config or default_settings_file(Path.cwd())
    if path is None:
        return overrides, args.data, args.out
    from_file = file_settings(path)
    if from_file:
        listed = ", ".join(f"{key} = {value!r}" for key, value in from_file.items())
        print(f"settings from {path}: {listed}")
    data_root, out_dir = from_file.pop("data-root", ""), from_file.pop("out-dir", "")
    data = args.data or (Path(str(data_root)) if data_root else None)
    out = args.out or (Path(str(out_dir)) if out_dir else None)
    return {**from_file, **overrides}, data, out


def default_out(overrides: dict[str, object], found: SiteDeclarations | None, sites: int) -> Path:
    """A `medfed simulate` run's folder without --out: runs/<time>-<task>, the task the run
    was given, else the one its first `sites` sites declare (as simulate.task_from_sites
    takes it)."""
    import time

    task = overrides.get("task")
    if not task and found is not None:
        task = found.first(sites).task()
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{task or 'segmentation'}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; 2 on a user error (printed as one line), 130 on Ctrl-C, 143 on
    SIGTERM."""
    from medfed.client.data.manifest import SiteDataError
    from medfed.shared_models.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, SiteDataError, OSError, ValueError, RuntimeError) as err:
        # OSError: a folder that cannot be written or read (permissions, a full disk, a
        # file where a folder is expected) is the user's to fix, not a bug.
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM where a command catches it
        print("medfed: interrupted", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)


def console() -> int:
    """The `medfed` command: `main`, then an exit that skips the interpreter's last
    garbage collection over torch's and MONAI's objects (about 1 s of every command)."""
    code = main()
    gc.freeze()  # the collector no longer walks what is alive; files are already closed
    return code


if __name__ == "__main__":
    sys.exit(console())
