"""A site's datalist for a MONAI bundle: the site's dataset.json, read by MONAI.

medfed's own readers do not touch the images of a bundle run: the bundle's
transforms load them. The site still decides which files are trained on and
which are held out, through its Decathlon `dataset.json` (the site layout of
docs and design): MONAI's `load_decathlon_datalist` resolves each entry
against the site folder, and the validation entries are the file's
`validation` list, else a seeded `val-fraction` of `training` (the split every
other medfed task uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from medfed.client.data.manifest import MANIFEST_JSON, SiteDataError
from medfed.client.data.site import carve_validation
from medfed.shared_models.config import RunConfig

TRAINING, VALIDATION = "training", "validation"


@dataclass(frozen=True)
class BundleData:
    """The entries (absolute paths) a bundle trains and validates on at one site."""

    root: Path
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]


def bundle_datalist(root: Path, cfg: RunConfig) -> BundleData:
    """The site's training and validation entries; SiteDataError naming the site's
    dataset.json when there is nothing to train and validate on."""
    root = root.expanduser().resolve()
    source = root / MANIFEST_JSON
    if not source.is_file():
        raise SiteDataError(
            f"{root}: no {MANIFEST_JSON} (task = bundle feeds the bundle this site's "
            "Decathlon datalist)"
        )
    try:
        declared = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SiteDataError(f"{source}: not readable JSON ({err})") from err
    if not isinstance(declared, dict) or not isinstance(declared.get(TRAINING), list):
        raise SiteDataError(f"{source}: no '{TRAINING}' list")
    train = _entries(source, root, declared, TRAINING)
    if isinstance(declared.get(VALIDATION), list) and declared[VALIDATION]:
        val = _entries(source, root, declared, VALIDATION)
    else:
        train, val = carve_validation(train, cfg, key=lambda entry: str(entry["image"]))
    if not train or not val:
        raise SiteDataError(
            f"{source}: not enough entries to train and validate ({len(train)} training, "
            f"{len(val)} validation)"
        )
    return BundleData(root=root, train=train, val=val)


def _entries(source: Path, root: Path, declared: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """One list of the datalist with its paths made absolute by MONAI; a label that is a
    path (segmentation) is resolved too, a class or a value is left as it is."""
    entries = declared[key]
    if not all(isinstance(e, dict) and isinstance(e.get("image"), str) for e in entries):
        raise SiteDataError(f"{source}: every '{key}' entry needs an 'image' path")
    masks = all(isinstance(e.get("label"), str) for e in entries)
    return load_decathlon_datalist(source, is_segmentation=masks, data_list_key=key, base_dir=root)
