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


def add_gan_commands(commands: argparse._SubParsersAction) -> None:
    gan = commands.add_parser("gan", help="use a federated GAN")
    gan_commands = gan.add_subparsers(dest="gan_command", required=True)
    sample = gan_commands.add_parser("sample", help="write generated images of one class")
    sample.add_argument("--model", type=Path, required=True, help="a gan run folder")
    sample.add_argument("--n", type=int, default=16, help="how many images")
    sample.add_argument("--class", dest="class_name", required=True, help="class name")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)


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
