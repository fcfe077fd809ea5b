"""The hospital's commands: `medfed data ...`, `medfed gan ...`, `medfed node start`."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed.client.synthetic import GENERATORS, generate_federation
from medfed.shared_models.config import TASK_NAMES

Commands = argparse._SubParsersAction


def command_group(commands: Commands, name: str, help_text: str) -> Commands:
    """`medfed NAME ...`: a group of sub-commands."""
    group = commands.add_parser(name, help=help_text)
    return group.add_subparsers(dest=f"{name}_command", required=True)


def add_data_commands(commands: Commands) -> None:
    """`medfed data synth` and `medfed data check`."""
    data_commands = command_group(commands, "data", "prepare and inspect site data")
    synth = data_commands.add_parser(
        "synth", help="write synthetic hospital site folders (dataset.json + images)"
    )
    synth.add_argument("--task", choices=sorted(GENERATORS), default="segmentation")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--images-per-site",
        type=int,
        help="mean images per site (each site draws 0.6x-1.4x of this; default 60, "
        "24 for segmentation3d)",
    )
    synth.add_argument(
        "--image-size", type=int, help="pixels per side (default 64; 32 for segmentation3d)"
    )
    synth.set_defaults(handler=_synth)

    check = data_commands.add_parser(
        "check", help="validate a site folder without training (exit 0 when usable)"
    )
    check.add_argument(
        "site", type=Path, help="the site folder (dataset.json, manifest.csv or a MedMNIST .npz)"
    )
    check.add_argument("--task", choices=TASK_NAMES, help="default: the 'task' in dataset.json")
    check.add_argument(
        "--out",
        type=Path,
        help="where to write data_report.json and "
        "samples.png (default: ./data-check-<site folder name>)",
    )
    check.set_defaults(handler=_check)


def add_gan_commands(commands: Commands) -> None:
    """`medfed gan sample`."""
    gan_commands = command_group(commands, "gan", "use a federated GAN")
    sample = gan_commands.add_parser("sample", help="write generated images of one class")
    sample.add_argument("--model", type=Path, required=True, help="a gan run folder")
    sample.add_argument("--n", type=int, default=16, help="how many images")
    sample.add_argument("--class", dest="class_name", required=True, help="class name")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)


def add_node_commands(commands: Commands) -> None:
    """`medfed node start`."""
    node_commands = command_group(commands, "node", "run a hospital's node")
    start = node_commands.add_parser("start", help="check the data, then a SuperNode")
    start.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    start.add_argument("--ca", type=Path, help="the consortium CA certificate")
    start.add_argument("--key", type=Path, help="this hospital's private key")
    start.add_argument("--data", type=Path, required=True, help="the site folder")
    start.add_argument("--name", help="site name in reports (default: the key's name)")
    start.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    start.add_argument("--task", help="task to check the data for (default: dataset.json)")
    start.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    start.add_argument("--state", type=Path, default=Path("node-state"))
    start.add_argument("--metrics-port", type=int)
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no authentication: local tests only"
    )
    start.set_defaults(handler=_node_start)


def _sample(args: argparse.Namespace) -> int:
    from medfed.client.gan import sample_images

    if args.n < 1:
        raise ValueError(f"--n {args.n}: expected a positive number of images")
    paths = sample_images(args.model, args.n, args.class_name, args.out, args.seed)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from medfed.client.data.check import run_check

    out = args.out or Path(f"data-check-{args.site.expanduser().resolve().name}")
    return run_check(args.site, args.task, out)


def _synth(args: argparse.Namespace) -> int:
    if args.sites < 1 or (args.images_per_site or 1) < 1 or (args.image_size or 16) < 16:
        raise ValueError("--sites and --images-per-site must be positive, --image-size >= 16")
    sites = generate_federation(
        args.task,
        args.sites,
        args.out,
        seed=args.seed,
        images_per_site=args.images_per_site,
        image_size=args.image_size,
    )
    for site in sites:
        count = len(list((site / "imagesTr").iterdir()))
        print(f"{site}: {count} images")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from medfed.client.node import NodeOptions, start_node
    from medfed.shared_models.runtime import options_from

    name = args.name or (args.key.stem if args.key else args.data.resolve().name)
    return start_node(options_from(NodeOptions, args, name=name))
