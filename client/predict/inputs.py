"""What `medfed predict --input PATH...` reads: files, DICOM series folders, site folders.

Each input becomes one case: the file (or series folder) MONAI reads, a unique
name for its outputs, and the modality that picks its intensity normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from medfed.client.data.manifest import MANIFEST_CSV, MANIFEST_JSON, read_manifest
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg", ".npy")


def is_dicom(path: Path) -> bool:
    """A DICOM file (by suffix, or the DICM marker of a file without one)."""
    if path.suffix.lower() == ".dcm":
        return True
    if not path.is_file() or path.suffix:
        return False
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def dicom_series(folder: Path) -> bool:
    """A folder holding one DICOM series: every file in it is DICOM."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(is_dicom(p) for p in files)


def dicom_modality(path: Path) -> str | None:
    """The Modality tag of a DICOM file, or of a series' first file."""
    first = min(p for p in path.iterdir() if p.is_file()) if path.is_dir() else path
    try:
        return str(pydicom.dcmread(first, stop_before_pixels=True).get("Modality") or "") or None
    except Exception:  # unreadable: the reader will say why when the case is read
        return None


def stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_cases(
    inputs: list[Path], cfg: RunConfig, skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """Every study named by `inputs`, in order; a name used twice gets a -2, -3 suffix.
    An input that does not exist is recorded in `skipped`."""
    cases: list[dict[str, Any]] = []
    for given in inputs:
        path = given.expanduser()
        if not path.exists():
            skipped[str(path)] = "no such file or folder"
        elif path.is_dir() and any((path / m).is_file() for m in (MANIFEST_JSON, MANIFEST_CSV)):
            cases += _site_cases(path, cfg)
        elif path.is_dir() and not dicom_series(path):
            cases += [_case(p, None) for p in sorted(path.iterdir()) if not p.name.startswith(".")]
        else:
            cases.append(_case(path, None))
    seen: dict[str, int] = {}
    for case in cases:
        seen[case["name"]] = seen.get(case["name"], 0) + 1
        if seen[case["name"]] > 1:
            case["name"] = f"{case['name']}-{seen[case['name']]}"
    return cases


def _case(path: Path, modality: str | None, name: str | None = None) -> dict[str, Any]:
    dicom = path.exists() and ((path.is_dir() and dicom_series(path)) or is_dicom(path))
    if dicom and modality is None:
        modality = dicom_modality(path)
    return {
        "image": str(path),
        "input": str(path),
        "name": name or stem(path),
        "modality": modality,
        "dicom": dicom,
    }


def _site_cases(root: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """Every labelled image a site folder's manifest lists (all splits), named by its path
    there (the manifest's own checks apply: its problems are the training run's too)."""
    manifest = read_manifest(
        root, TASKS[cfg.task].label_kind, len(cfg.classes), cfg.max_image_megabytes
    )
    cases = []
    for entries in manifest.splits.values():
        for entry in entries:
            relative = Path(entry["where"])
            name = "__".join((*relative.parent.parts, stem(relative)))
            cases.append(_case(Path(entry["image"]), manifest.modality, name))
    return cases
