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
    sim.add_argument("--strategy", help="fedavg | fedprox")
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
    return parser


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
    except (ConfigError, SiteDataError, FileExistsError, ValueError) as err:
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
