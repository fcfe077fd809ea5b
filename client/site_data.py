"""Reading one hospital's site folder: dataset.json (MSD style) or a CSV manifest.

Most real deployments fail here, so every problem is reported with the file
and the key or row that caused it, before any training starts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

MANIFEST_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"


class SiteDataError(ValueError):
    """A problem with a site folder; the message names the file and the fault."""


@dataclass(frozen=True)
class SiteData:
    """A validated site: absolute image/label entries split into train and validation."""

    name: str
    root: Path
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]


def read_manifest(root: Path) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """Entries (paths relative to `root`) and the declared labels, if any."""
    if not root.is_dir():
        raise SiteDataError(f"site folder {root} does not exist or is not a folder")
    json_path, csv_path = root / MANIFEST_JSON, root / MANIFEST_CSV
    if json_path.exists():
        try:
            manifest = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise SiteDataError(f"{json_path}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict):
            raise SiteDataError(f"{json_path}: expected a JSON object at the top level")
        entries = manifest.get("training")
        if not isinstance(entries, list):
            raise SiteDataError(f"{json_path}: key 'training' must be a list of entries")
        labels = manifest.get("labels")
        if labels is not None and not isinstance(labels, dict):
            raise SiteDataError(f"{json_path}: key 'labels' must be an object like {{\"0\": ...}}")
        return entries, labels
    if csv_path.exists():
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                raise SiteDataError(f"{csv_path}: needs the columns 'image' and 'label'")
            rows = [row for row in reader if row.get("split", "train") in ("", "train")]
        return rows, None
    raise SiteDataError(f"{root}: no {MANIFEST_JSON} or {MANIFEST_CSV} found")


def load_site(root: Path, cfg: RunConfig, name: str | None = None) -> SiteData:
    """Validate the site against the run's task and classes; split it deterministically."""
    root = root.expanduser().resolve()
    entries, labels = read_manifest(root)
    source = root / (MANIFEST_JSON if (root / MANIFEST_JSON).exists() else MANIFEST_CSV)
    task = TASKS[cfg.task]
    if labels is not None:
        declared = [labels[k] for k in sorted(labels, key=int)] if _int_keys(labels) else None
        if declared != list(cfg.classes):
            raise SiteDataError(
                f"{source}: labels {labels} do not match the run's classes {list(cfg.classes)}"
            )
    items = [
        _resolve_entry(root, source, i, e, task.label_kind, len(cfg.classes))
        for i, e in enumerate(entries)
    ]
    if len(items) < 2:
        raise SiteDataError(f"{source}: needs at least 2 training entries, found {len(items)}")
    order = sorted(range(len(items)), key=lambda i: items[i]["image"])
    random.Random(cfg.seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * cfg.val_fraction)))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return SiteData(name=name or root.name, root=root, train=train, val=val)


def _int_keys(labels: dict[str, Any]) -> bool:
    return all(str(k).isdigit() for k in labels)


def _resolve_entry(
    root: Path, source: Path, index: int, entry: Any, label_kind: str, num_classes: int
) -> dict[str, Any]:
    where = f"{source}: entry {index}"
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise SiteDataError(f"{where}: needs 'image' and 'label'")
    item: dict[str, Any] = {"image": _inside(root, where, entry["image"])}
    if label_kind == "mask":
        item["label"] = _inside(root, where, entry["label"])
    else:
        try:
            label = int(entry["label"])
        except (TypeError, ValueError):
            raise SiteDataError(f"{where}: label {entry['label']!r} is not a class index") from None
        if not 0 <= label < num_classes:
            raise SiteDataError(f"{where}: label {label} outside 0..{num_classes - 1}")
        item["label"] = label
    return item


def _inside(root: Path, where: str, relative: Any) -> str:
    if not isinstance(relative, str) or not relative:
        raise SiteDataError(f"{where}: file path {relative!r} is not a string")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SiteDataError(f"{where}: {relative} points outside the site folder")
    if not path.is_file():
        raise SiteDataError(f"{where}: file {path} does not exist")
    return str(path)
