"""Site manifests: MSD dataset.json, a CSV manifest, or a MedMNIST-style .npz.

A broken manifest (unreadable JSON, no entry list, labels that contradict
the run) stops the site with one error naming the file. A broken *entry*
(missing file, a path outside the site, a bad class index) is recorded as a
Problem and skipped, so one bad row never stops a hospital from training.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.data.image_headers import Declared, npz_headers

MANIFEST_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"
SPLITS = ("train", "val", "test")


class SiteDataError(ValueError):
    """A site cannot be used at all; the message names the file and the fault."""


@dataclass(frozen=True)
class Problem:
    """One skipped file or entry; `where` is relative to the site (never sent out)."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Manifest:
    """Entries per split, with paths resolved and class labels checked."""

    source: Path
    splits: dict[str, list[dict[str, Any]]]
    labels: dict[str, str] | None
    modality: str | None
    problems: list[Problem] = field(default_factory=list)


def declared_classes(labels: Any) -> list[str] | None:
    """The class names a dataset.json 'labels' object declares, in index order; None when
    it declares none or is not keyed by indices ({"0": "background", "1": ...})."""
    if not isinstance(labels, dict) or not labels:
        return None
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses
    if not all(str(k).isascii() and str(k).isdigit() for k in labels):
        return None
    return [str(labels[k]) for k in sorted(labels, key=int)]


def find_manifest(root: Path) -> Path:
    """The site's manifest: dataset.json, else manifest.csv, else its one .npz archive."""
    if not root.is_dir():
        raise SiteDataError(f"site folder {root} does not exist or is not a folder")
    for name in (MANIFEST_JSON, MANIFEST_CSV):
        if (root / name).is_file():
            return root / name
    archives = sorted(root.glob("*.npz"))
    if len(archives) == 1:
        return archives[0]
    if len(archives) > 1:
        raise SiteDataError(f"{root}: {len(archives)} .npz files; keep one per site folder")
    if not any(root.iterdir()):
        raise SiteDataError(f"site folder {root} is empty")
    raise SiteDataError(f"{root}: no {MANIFEST_JSON}, {MANIFEST_CSV} or MedMNIST .npz found")


def read_manifest(
    root: Path, label_kind: str, num_classes: int, max_megabytes: int = 1024
) -> Manifest:
    """Read whichever manifest the site has; `label_kind` is "mask", "class" or "value".

    `max_megabytes` bounds one image of a .npz archive, from its header, before
    the archive is loaded (config key 'max-image-megabytes').
    """
    source = find_manifest(root)
    if source.suffix == ".npz":
        _check_npz_headers(source, max_megabytes)
        return _read_npz(source, num_classes)
    raw = read_rows(source)
    manifest = Manifest(source, {s: [] for s in SPLITS}, raw["labels"], raw["modality"])
    for split, rows in raw["splits"].items():
        for index, row in rows:
            where = f"{source.name} {split} entry {index}"
            entry = _resolve(root, where, row, (label_kind, num_classes), manifest.problems)
            if entry is not None:
                manifest.splits[split].append(entry)
    return manifest


def read_rows(source: Path) -> dict[str, Any]:
    """A dataset.json or manifest.csv as written, before any path is resolved: its rows per
    split (as (index, row) pairs), its declared task, labels and modality."""
    return _read_json(source) if source.suffix == ".json" else _read_csv(source)


def _read_json(source: Path) -> dict[str, Any]:
    try:
        data = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SiteDataError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SiteDataError(f"{source}: expected a JSON object at the top level")
    if not isinstance(data.get("training"), list):
        raise SiteDataError(f"{source}: key 'training' must be a list of entries")
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise SiteDataError(f"{source}: key 'labels' must be an object like {{\"0\": ...}}")
    modality = data.get("modality")
    if isinstance(modality, dict):
        modality = modality.get("0")
    splits = {"train": list(enumerate(data["training"]))}
    for key, split in (("validation", "val"), ("test", "test")):
        rows = data.get(key) or []
        if not isinstance(rows, list):
            raise SiteDataError(f"{source}: key '{key}' must be a list of entries")
        # MSD test entries are often bare image paths with no label: not usable for metrics.
        splits[split] = [(i, r) for i, r in enumerate(rows) if isinstance(r, dict)]
    return {
        "splits": splits,
        "task": data.get("task"),
        "labels": labels,
        "modality": modality if isinstance(modality, str) else None,
    }


def _read_csv(source: Path) -> dict[str, Any]:
    try:
        return _parse_csv(source)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"{source}: not a readable UTF-8 CSV file ({err})") from None


def _parse_csv(source: Path) -> dict[str, Any]:
    with source.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise SiteDataError(f"{source}: needs the columns 'image' and 'label'")
        splits: dict[str, list[tuple[int, dict[str, Any]]]] = {s: [] for s in SPLITS}
        for index, row in enumerate(reader):
            split = (row.get("split") or "train").strip().lower()
            split = {"training": "train", "validation": "val"}.get(split, split)
            if split not in splits:
                raise SiteDataError(
                    f"{source} row {index + 2}: split {split!r} is not one of train, val, test"
                )
            splits[split].append((index, row))
    return {"splits": splits, "task": None, "labels": None, "modality": None}


def _check_npz_headers(source: Path, max_megabytes: int) -> None:
    """Refuse an archive whose headers declare an image over the limit, or more data than
    the archive's directory says it holds, before NumPy allocates a single array."""
    try:
        with zipfile.ZipFile(source) as archive:
            sizes = {i.filename.removesuffix(".npy"): i.file_size for i in archive.infolist()}
        headers = dict(npz_headers(source))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SiteDataError(f"{source}: not a readable .npz archive ({err})") from None
    for name, claim in headers.items():
        held = math.prod(claim.shape) * claim.itemsize
        if held > sizes[name]:
            raise SiteDataError(
                f"{source}: array '{name}' declares shape {claim.describe()} "
                f"({held} bytes) but holds {sizes[name]} bytes"
            )
        one = Declared(claim.shape[1:], claim.itemsize)
        if name.endswith("_images") and one.megabytes > max_megabytes:
            raise SiteDataError(
                f"{source}: array '{name}' declares images of shape {one.describe()}, "
                f"{one.megabytes:.4g} MB each decoded: over the limit "
                f"(config key 'max-image-megabytes' = {max_megabytes})"
            )


def _read_npz(source: Path, num_classes: int) -> Manifest:
    """MedMNIST layout: {train,val,test}_{images,labels} arrays in one file."""
    try:
        archive = np.load(source)
        arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SiteDataError(f"{source}: not a readable .npz archive ({err})") from None
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise SiteDataError(f"{source}: needs arrays 'train_images' and 'train_labels'")
    manifest = Manifest(source, {s: [] for s in SPLITS}, None, None)
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            continue
        _check_npz_split(source, split, images, labels)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            value = np.asarray(label).reshape(-1)[0]  # multi-label archives: the first label
            where = f"{source.name} {split}[{index}]"
            if not (np.isfinite(value) and float(value).is_integer()):
                manifest.problems.append(Problem(where, f"label {value!r} is not a class index"))
                continue
            if not 0 <= value < num_classes:
                manifest.problems.append(
                    Problem(where, f"label {int(value)} outside 0..{num_classes - 1}")
                )
                continue
            manifest.splits[split].append(
                {"image": np.asarray(image), "label": int(value), "where": f"{split}[{index}]"}
            )
    return manifest


def _check_npz_split(source: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Numeric images (N, H, W[, C]) or volumes, and one row of numeric labels per image."""
    if images.dtype.kind not in "biuf" or not 3 <= images.ndim <= 5:
        raise SiteDataError(
            f"{source}: {split}_images is {images.dtype}{images.shape}; expected numbers "
            "shaped (images, height, width[, channels or depth])"
        )
    if labels.dtype.kind not in "biuf" or labels.ndim not in (1, 2) or 0 in labels.shape[1:]:
        raise SiteDataError(
            f"{source}: {split}_labels is {labels.dtype}{labels.shape}; expected numbers "
            "shaped (images,) or (images, labels)"
        )
    if len(images) != len(labels):
        raise SiteDataError(
            f"{source}: {split}_images has {len(images)} items but {split}_labels has {len(labels)}"
        )


def _resolve(
    root: Path, where: str, row: Any, labels: tuple[str, int], problems: list[Problem]
) -> dict[str, Any] | None:
    """One manifest row with its paths resolved inside the site, or None (a Problem noted).

    `labels` is (label kind, number of classes) of the run's task.
    """
    label_kind, num_classes = labels
    if not isinstance(row, dict) or "image" not in row or "label" not in row:
        problems.append(Problem(where, "needs 'image' and 'label'"))
        return None
    image = _inside(root, where, row["image"], problems)
    if image is None:
        return None
    entry: dict[str, Any] = {"image": image, "where": str(Path(image).relative_to(root))}
    if label_kind == "mask":
        label = _inside(root, where, row["label"], problems)
        if label is None:
            return None
        entry["label"] = label
        return entry
    if label_kind == "value":
        try:
            number = float(row["label"])
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            problems.append(Problem(where, f"label {row['label']!r} is not a finite number"))
            return None
        entry["label"] = number
        return entry
    try:
        value = int(row["label"])
    except (TypeError, ValueError):
        problems.append(Problem(where, f"label {row['label']!r} is not a class index"))
        return None
    if not 0 <= value < num_classes:
        problems.append(Problem(where, f"label {value} outside 0..{num_classes - 1}"))
        return None
    entry["label"] = value
    return entry


def _inside(root: Path, where: str, relative: Any, problems: list[Problem]) -> str | None:
    if not isinstance(relative, str) or not relative.strip():
        problems.append(Problem(where, f"file path {relative!r} is not a string"))
        return None
    try:  # a NUL byte or an over-long name is refused by the OS: named, never a crash
        path = (root / relative.strip()).resolve()
        inside, found = path.is_relative_to(root), path.exists()
    except (ValueError, OSError) as err:
        problems.append(Problem(where, f"file path {relative!r} is not usable: {err}"))
        return None
    if not inside:
        problems.append(Problem(where, f"{relative} points outside the site folder"))
        return None
    if not found:
        problems.append(Problem(where, f"{relative} does not exist"))
        return None
    return str(path)
