"""`medfed export RUN_DIR --format bundle|torchscript --out DIR`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from medfed.client.data.transforms import resolve_modality
from medfed.client.export.bundle_writer import Origin, write_bundle, write_federated_bundle
from medfed.client.export.torchscript import write_torchscript
from medfed.client.local_layers import site_model
from medfed.client.predict.writers import new_output_folder
from medfed.client.run_bundle import checked_bundle
from medfed.shared_models.run_folder import load_global_model, read_model_config

FORMATS = ("bundle", "torchscript")


@dataclass
class ExportOptions:
    run_dir: Path
    format: str
    out: Path
    modality: str | None = None  # picks the intensity normalisation (CT: a HU window)
    site_layers: Path | None = None  # FedBN: a hospital's kept normalisation layers
    bundle: Path | None = None  # task = bundle: the bundle folder the user vouches for
    state: Path = Path("node-state")  # the node state whose approvals a bundle copy needs


def export_run(options: ExportOptions) -> int:
    """Write the export; refuse an output folder that already holds files (nothing is
    overwritten)."""
    if options.format not in FORMATS:
        raise ValueError(f"--format {options.format!r}: expected one of {', '.join(FORMATS)}")
    run_dir = options.run_dir.expanduser()
    if read_model_config(run_dir).task == "bundle":
        return _export_bundle_run(options, run_dir)
    if options.bundle is not None:
        raise ValueError(f"--bundle {options.bundle}: {run_dir} is not a task = bundle run")
    out = new_output_folder(options.out.expanduser())
    cfg, net = load_global_model(run_dir)
    modality = resolve_modality(cfg, options.modality)
    if options.modality and options.modality.upper() != modality:
        raise ValueError(
            f"--modality {options.modality}: the run was trained with config key 'modality' = "
            f"{modality}, whose intensity normalisation the model expects"
        )
    caveat = site_model(cfg, net, options.site_layers)
    if caveat:  # also in the bundle's metadata and README, for whoever runs it later
        print(f"medfed: warning: {caveat}", file=sys.stderr)
    if options.format == "bundle":
        origin = Origin(run_dir, caveat, options.site_layers)
        path = write_bundle(origin, cfg, net, modality, out)
        print(
            f"wrote the MONAI bundle {path}; run it with: cd {path} && python -m monai.bundle "
            "run --config_file configs/inference.json --dataset_dir IMAGES --output_dir OUT"
        )
    else:
        path = write_torchscript(cfg, net, modality, out, caveat)
        print(f"wrote {path} (TorchScript; its preprocessing is in the file's medfed.json)")
    return 0


def _export_bundle_run(options: ExportOptions, run_dir: Path) -> int:
    """A federated MONAI bundle goes back out as that bundle, from a bundle folder checked
    for this site (client/run_bundle.py) before any of its configs is read."""
    if options.format != "bundle":
        raise ValueError(f"{run_dir}: a task = bundle run exports as --format bundle only")
    source = checked_bundle(run_dir, options.bundle, options.state.expanduser())
    out = new_output_folder(options.out.expanduser())
    cfg, net = load_global_model(run_dir, source)
    path = write_federated_bundle(Origin(run_dir), cfg, net, source, out)
    print(f"wrote {path}: the bundle {source} with the federated weights (models/model.pt)")
    return 0
