"""Site-side commands: `medfed data ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed.client.synthetic import GENERATORS, generate_federation


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare and inspect site data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
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
        default=60,
        help="mean images per site (each site draws 0.6x-1.4x of this)",
    )
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(handler=_synth)

    check = data_commands.add_parser(
        "check", help="validate a site folder without training (exit 0 when usable)"
    )
    check.add_argument(
        "site", type=Path, help="the site folder (dataset.json, manifest.csv or a MedMNIST .npz)"
    )
    check.add_argument(
        "--task",
        choices=["segmentation", "classification"],
        help="default: the 'task' in dataset.json",
    )
    check.add_argument(
        "--out",
        type=Path,
        help="where to write data_report.json and "
        "samples.png (default: ./data-check-<site folder name>)",
    )
    check.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from medfed.client.data.check import run_check

    out = args.out or Path(f"data-check-{args.site.expanduser().resolve().name}")
    return run_check(args.site, args.task, out)


def _synth(args: argparse.Namespace) -> int:
    if args.sites < 1 or args.images_per_site < 1 or args.image_size < 16:
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
