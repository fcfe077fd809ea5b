"""The `medfed` command line: one entry point for hospitals, operators and researchers.

User errors (bad config, bad data) print one line naming the key, file or
value and exit non-zero; only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from medfed.client.cli import add_commands as add_site_commands
    from medfed.client.cli import add_gan_commands

    parser = argparse.ArgumentParser(prog="medfed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_site_commands(commands)
    add_gan_commands(commands)

    sim = commands.add_parser("simulate", help="run a whole federation on this machine")
    sim.add_argument(
        "--task",
        help="segmentation | segmentation3d | classification | regression | gan "
        "(default: segmentation)",
    )
    sim.add_argument("--model", help="network, e.g. unet, smallcnn, densenet121")
    sim.add_argument(
        "--sites",
        type=int,
        help="number of hospitals (default 3, or all site folders under --data)",
    )
    sim.add_argument("--rounds", type=int, help="federated rounds (num-server-rounds)")
    sim.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedmedian, krum, ... (README)")
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
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any [tool.flwr.app.config] key, e.g. -c lr=0.001 (repeatable)",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's full log")
    sim.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics of the whole "
        "simulated federation on this port while it runs",
    )
    sim.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (0.0.0.0 to reach it from containers)",
    )
    sim.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep serving metrics this long after the run (a last scrape)",
    )
    sim.set_defaults(handler=_simulate)
    _add_deployment_commands(commands)
    return parser


def _add_deployment_commands(commands: argparse._SubParsersAction) -> None:
    certs = commands.add_parser("certs", help="consortium CA, TLS certificate, hospital keys")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
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
    hospital = certs_commands.add_parser("add-hospital", help="a hospital's key pair")
    hospital.add_argument("name")
    hospital.add_argument("--out", type=Path, default=Path("certs"))
    hospital.set_defaults(handler=_certs_add_hospital)

    coordinator = commands.add_parser("coordinator", help="run the consortium's coordinator")
    coordinator_commands = coordinator.add_subparsers(dest="coordinator_command", required=True)
    start = coordinator_commands.add_parser("start", help="SuperLink with TLS and node auth")
    start.add_argument("--certs", type=Path, help="folder from `medfed certs init`")
    start.add_argument("--host", default="0.0.0.0")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument("--state", type=Path, default=Path("coordinator-state"))
    start.add_argument("--metrics-port", type=int)
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication: local tests only"
    )
    start.set_defaults(handler=_coordinator_start)
    admit = coordinator_commands.add_parser(
        "admit", help="register a hospital's key (flwr supernode register) and audit it"
    )
    admit.add_argument("name")
    admit.add_argument("--certs", type=Path, default=Path("certs"))
    admit.add_argument("--state", type=Path, default=Path("coordinator-state"))
    admit.add_argument(
        "--connection",
        help="Flower SuperLink connection name (default: the default in your Flower config)",
    )
    admit.set_defaults(handler=_coordinator_admit)
    pull = coordinator_commands.add_parser("pull", help="copy a finished run's folder out")
    pull.add_argument("run_id")
    pull.add_argument("--state", type=Path, default=Path("coordinator-state"))
    pull.add_argument("--to", type=Path, required=True)
    pull.set_defaults(handler=_coordinator_pull)

    node = commands.add_parser("node", help="run a hospital's node")
    node_commands = node.add_subparsers(dest="node_command", required=True)
    node_start = node_commands.add_parser("start", help="check the data, then a SuperNode")
    node_start.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    node_start.add_argument("--ca", type=Path, help="the consortium CA certificate")
    node_start.add_argument("--key", type=Path, help="this hospital's private key")
    node_start.add_argument("--data", type=Path, required=True, help="the site folder")
    node_start.add_argument("--name", help="site name in reports (default: the key's name)")
    node_start.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    node_start.add_argument("--task", help="task to check the data for (default: dataset.json)")
    node_start.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    node_start.add_argument("--state", type=Path, default=Path("node-state"))
    node_start.add_argument("--metrics-port", type=int)
    node_start.add_argument(
        "--insecure", action="store_true", help="no TLS, no authentication: local tests only"
    )
    node_start.set_defaults(handler=_node_start)


def _certs_init(args: argparse.Namespace) -> int:
    from medfed.server.certs import init_consortium

    for path in init_consortium(args.out, args.host):
        print(f"wrote {path}")
    print(f"next: medfed certs add-hospital NAME --out {args.out}")
    return 0


def _certs_add_hospital(args: argparse.Namespace) -> int:
    from medfed.server.certs import add_hospital

    folder = add_hospital(args.out, args.name)
    print(
        f"wrote {folder}: give the hospital this folder (ca.pem, {args.name}.key); "
        f"admit it with: flwr supernode register {folder / (args.name + '.pub')} <superlink>"
    )
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    from medfed.server.coordinator import start_coordinator

    return start_coordinator(
        args.certs, args.host, args.port, args.state, args.metrics_port, args.insecure
    )


def _coordinator_admit(args: argparse.Namespace) -> int:
    from medfed.server.coordinator import admit_hospital

    node_id = admit_hospital(args.certs, args.name, args.state, args.connection)
    print(f"admitted {args.name} as node {node_id}")
    return 0


def _coordinator_pull(args: argparse.Namespace) -> int:
    from medfed.server.coordinator import pull_run

    print(f"copied run {args.run_id} to {pull_run(args.state, args.run_id, args.to)}")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from medfed.client.node import start_node

    name = args.name or (args.key.stem if args.key else args.data.resolve().name)
    return start_node(
        args.coordinator,
        args.ca,
        args.key,
        args.data,
        name,
        args.device,
        args.runtime_port,
        args.state,
        args.metrics_port,
        args.task,
        args.insecure,
    )


def _simulate(args: argparse.Namespace) -> int:
    import time

    from medfed.client.data.locate import site_folders
    from medfed.server.simulate import Simulation, run
    from medfed.shared_models.config import ConfigError

    overrides: dict[str, object] = {}
    for item in args.run_config:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--run-config {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    for flag, key in (
        ("task", "task"),
        ("model", "model"),
        ("rounds", "num-server-rounds"),
        ("strategy", "strategy"),
        ("seed", "seed"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    sites = args.sites
    if sites is None:
        sites = len(site_folders(args.data.expanduser())) if args.data else 3
    task = overrides.get("task", "segmentation")
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}"
    return run(
        Simulation(
            overrides=overrides,
            sites=sites,
            out=out,
            data=args.data,
            images_per_site=args.images_per_site,
            cpus_per_site=args.cpus_per_site,
            verbose=args.verbose,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_linger=args.metrics_linger,
        )
    )


def main(argv: list[str] | None = None) -> int:
    from medfed.client.data.manifest import SiteDataError
    from medfed.shared_models.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, SiteDataError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
