"""The hospital's commands: `medfed data ...`, `medfed gan ...`, `medfed node start`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfed.shared_models.command_options import add_metrics_arguments
from medfed.shared_models.task_descriptions import SITE_DATA_TASKS

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
    synth.add_argument("--task", choices=SITE_DATA_TASKS, default="segmentation")
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
        choices=SITE_DATA_TASKS,
        help="default: the 'task' in dataset.json",
    )
    check.add_argument(
        "--out",
        type=Path,
        help="write data_report.json and samples.png (a grid of images and masks) there "
        "(default: print the report only)",
    )
    check.set_defaults(handler=_check)
    _add_pull(data_commands)


def _add_pull(data_commands: Commands) -> None:
    pull = data_commands.add_parser(
        "pull", help="retrieve a cohort from the hospital's PACS into a site folder"
    )
    pull.add_argument("cohort", type=Path, help="the cohort file (TOML: [pacs] [query] [labels])")
    pull.add_argument("--out", type=Path, help="the site folder (created; reruns add to it)")
    pull.add_argument(
        "--echo", action="store_true", help="only check that the PACS answers (C-ECHO / QIDO-RS)"
    )
    pull.add_argument(
        "--min-count", type=int, default=10,
        help="counts below this are not written to the audit log (default 10)",
    )  # fmt: skip
    pull.set_defaults(handler=_pull)


def add_predict_command(commands: Commands) -> None:
    """`medfed predict`: a finished run's model applied to new studies."""
    predict = commands.add_parser(
        "predict", help="apply a run's global model to new studies (masks, DICOM SEG, CSV)"
    )
    predict.add_argument("--model", type=Path, required=True, help="a finished run folder")
    predict.add_argument(
        "--input",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="NIfTI, DICOM (file or series folder), PNG/JPEG files, folders of them, "
        "or site folders (dataset.json / manifest.csv)",
    )
    predict.add_argument("--out", type=Path, required=True, help="where results are written")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--batch-size", type=int, default=4, help="studies per network call")
    predict.add_argument(
        "--site-layers",
        type=Path,
        metavar="FILE",
        help="strategy = fedbn: this hospital's kept normalisation layers "
        "(<cache-dir>/fedbn/run-<run id>.pt on its node), making the model the hospital's own",
    )
    predict.add_argument(
        "--cohort", type=Path, metavar="FILE",
        help="a cohort file (medfed data pull): its studies are retrieved from the PACS and "
        "predicted too",
    )  # fmt: skip
    predict.add_argument(
        "--push", action="store_true",
        help="store the results in the cohort's PACS: DICOM SEG (segmentation), SR (class, value)",
    )  # fmt: skip
    predict.set_defaults(handler=_predict)


def add_export_command(commands: Commands) -> None:
    """`medfed export`: a run's model for use outside medfed."""
    export = commands.add_parser(
        "export", help="a run's model as a MONAI bundle or TorchScript, for use without medfed"
    )
    export.add_argument("run_dir", type=Path, help="a finished run folder")
    export.add_argument("--format", choices=("bundle", "torchscript"), default="bundle")
    export.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    export.add_argument(
        "--modality",
        help="the images' modality (CT: a HU window; others: percentile scaling); "
        "default: the run's modality setting, else the task's usual one",
    )
    export.add_argument(
        "--site-layers",
        type=Path,
        metavar="FILE",
        help="strategy = fedbn: a hospital's kept normalisation layers; the export is then "
        "that hospital's own model",
    )
    export.add_argument(
        "--bundle",
        type=Path,
        metavar="PATH",
        help="task = bundle: the bundle folder to export the federated weights with (its "
        "configs must hash as the run's); default: the run folder's copy, once its hash is "
        "approved at this site",
    )
    export.add_argument(
        "--state",
        type=Path,
        default=Path("node-state"),
        help="task = bundle: the node state whose approvals (`medfed node approve`) the run "
        "folder's bundle copy needs (default: node-state)",
    )
    export.set_defaults(handler=_export)


def add_gan_commands(commands: Commands) -> None:
    """`medfed gan sample`."""
    gan_commands = command_group(commands, "gan", "use a federated GAN")
    sample = gan_commands.add_parser("sample", help="write generated images of one class")
    sample.add_argument("--model", type=Path, required=True, help="a gan run folder")
    sample.add_argument("--n", type=int, default=16, help="how many images")
    sample.add_argument(
        "--class", dest="class_name", required=True, help="class name or index, e.g. covid or 2"
    )
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)


def add_node_commands(commands: Commands) -> None:
    """`medfed node start`."""
    node_commands = command_group(commands, "node", "run a hospital's node")
    keygen = node_commands.add_parser(
        "keygen", help="make this hospital's key pair (the private key stays here)"
    )
    keygen.add_argument("name", help="the hospital's name (lower-case letters, digits, dashes)")
    keygen.add_argument("--out", type=Path, default=Path("node-keys"))
    keygen.set_defaults(handler=_node_keygen)
    inspect = node_commands.add_parser(
        "inspect",
        help="what an app package contains (a .fab file, or a refused package's hash), "
        "or what a MONAI bundle folder's hash covers",
    )
    inspect.add_argument(
        "package", help="a .fab file, the start of a refused package's hash, or a bundle folder"
    )
    inspect.add_argument("--state", type=Path, default=Path("node-state"))
    inspect.set_defaults(handler=_node_inspect)
    approve = node_commands.add_parser(
        "approve", help="let this node run an app package (by its SHA-256)"
    )
    approve.add_argument("sha256", help="the package's SHA-256 (medfed node inspect shows it)")
    approve.add_argument("--note", default="", help="who approved it and why (audited)")
    approve.add_argument("--state", type=Path, default=Path("node-state"))
    approve.set_defaults(handler=_node_approve)
    revoke = node_commands.add_parser("revoke", help="withdraw an app package's approval")
    revoke.add_argument("sha256")
    revoke.add_argument("--state", type=Path, default=Path("node-state"))
    revoke.set_defaults(handler=_node_revoke)
    _add_start_command(node_commands)


def _add_start_command(node_commands: Commands) -> None:
    """`medfed node start` and its options."""
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
    add_metrics_arguments(start)
    start.add_argument(
        "--min-count",
        type=int,
        default=10,
        help="the site's privacy floor: no count of images below it leaves the site, "
        "whatever the coordinator asks (default 10)",
    )
    start.add_argument(
        "--require-secure-aggregation",
        action="store_true",
        help="train only in runs with secure aggregation: the run config, which the operator "
        "chooses, can then never have this site's update sent in the clear",
    )
    start.add_argument(
        "--cold",
        dest="warm",
        action="store_false",
        help="start each ClientApp process from scratch, as Flower does, instead of forking "
        "it from the node's warm worker (slower: each imports torch and MONAI)",
    )
    start.add_argument(
        "--flower-waits",
        action="store_true",
        help="keep Flower's fixed waits (a 3 s sleep whenever no message is waiting, reply "
        "checks every 0.5 s, 1 s before asking again for a message object not there yet) "
        "instead of medfed's shorter ones while a run is active",
    )
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no authentication: local tests only"
    )
    start.set_defaults(handler=_node_start)


def _predict(args: argparse.Namespace) -> int:
    from medfed.client.predict import PredictOptions, run_predict
    from medfed.shared_models.command_options import options_from

    return run_predict(options_from(PredictOptions, args))


def _export(args: argparse.Namespace) -> int:
    from medfed.client.export import ExportOptions, export_run
    from medfed.shared_models.command_options import options_from

    return export_run(options_from(ExportOptions, args))


def _sample(args: argparse.Namespace) -> int:
    from medfed.client.gan_samples import sample_images

    if args.n < 1:
        raise ValueError(f"--n {args.n}: expected a positive number of images")
    paths = sample_images(args.model, args.n, args.class_name, args.out, args.seed)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from medfed.client.data.check import run_check

    return run_check(args.site, args.task, args.out)


def _pull(args: argparse.Namespace) -> int:
    from medfed.client.pacs.cohort import load_cohort
    from medfed.client.pacs.pull import connect, describe_report, pull

    cohort = load_cohort(args.cohort)
    if args.echo:
        pacs = connect(cohort.pacs)
        try:
            print(pacs.echo())
        finally:
            pacs.close()
        return 0
    if args.out is None:
        raise ValueError("--out: the site folder to pull the cohort into")
    report = pull(cohort, args.out, min_count=args.min_count)
    for line in describe_report(report, args.out):
        print(line)
    if not report.found:
        print(f"medfed: the query of {args.cohort} matches no study: check [query] (dates are "
              "YYYYMMDD-YYYYMMDD; series-description is a pattern such as '*AX*')",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _synth(args: argparse.Namespace) -> int:
    from medfed.client.synthetic import generate_federation  # MONAI: only when used

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


def _node_keygen(args: argparse.Namespace) -> int:
    from medfed.client.keys import generate_key_pair

    private, public = generate_key_pair(args.out, args.name)
    print(f"wrote {private} (0600: it never leaves this hospital) and {public}")
    print(
        f"next: send {public.name} to the consortium operator, who admits it with "
        f"`medfed coordinator admit {args.name} --public-key {public.name}`"
    )
    return 0


def _node_inspect(args: argparse.Namespace) -> int:
    from medfed.client import approval

    if (Path(args.package).expanduser() / "configs").is_dir():
        return _inspect_bundle(Path(args.package).expanduser(), args.state)
    package = approval.inspect(approval.find_package(args.state, args.package))
    digest = package["sha256"]
    status = "approved" if digest in approval.approved(args.state) else "NOT approved"
    print(f"app package sha256 {digest} ({status} at {args.state})")
    for role, component in sorted(package["components"].items()):
        print(f"runs {role} = {component}")
    print(f"files ({len(package['files'])}):")
    for entry in package["files"]:
        print(f"  {entry.sha256[:12]}  {entry.size:>9}  {entry.name}")
    if status != "approved":
        print(f"approve it with: medfed node approve {digest} --state {args.state}")
    return 0


def _inspect_bundle(root: Path, state: Path) -> int:
    """What a MONAI bundle's hash covers (the code a bundle run executes), and its approval."""
    import hashlib

    from medfed.client import approval
    from medfed.shared_models.monai_bundle import Bundle

    bundle = Bundle(root)
    status = "approved" if bundle.sha256 in approval.approved(state) else "NOT approved"
    print(f"MONAI bundle sha256 {bundle.sha256} ({status} at {state})")
    files = bundle.hashed_files()
    print(f"files its hash covers ({len(files)}; configs are code: `_target_` and `$` run):")
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"  {digest[:12]}  {path.stat().st_size:>9}  {path.relative_to(bundle.root)}")
    if status != "approved":
        print(f"approve it with: medfed node approve {bundle.sha256} --state {state}")
    return 0


def _node_approve(args: argparse.Namespace) -> int:
    from medfed.client import approval

    approval.approve(args.state, args.sha256, args.note)
    print(f"approved {args.sha256.lower()} at {args.state} (audited)")
    return 0


def _node_revoke(args: argparse.Namespace) -> int:
    from medfed.client import approval

    if not approval.revoke(args.state, args.sha256):
        raise ValueError(f"{args.sha256}: not an approved package at {args.state}")
    print(f"revoked {args.sha256.lower()} at {args.state} (audited)")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from medfed.client.node import NodeOptions, start_node
    from medfed.shared_models.command_options import options_from

    name = args.name or (args.key.stem if args.key else args.data.resolve().name)
    return start_node(options_from(NodeOptions, args, name=name))
