"""What `medfed predict --input PATH...` reads: files, DICOM series folders, site folders.

Each input becomes one case: the file (or series folder) MONAI reads, a unique
name for its outputs, and the modality that picks its intensity normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.misc import is_dicom

from medfed.client.data.manifest import MANIFEST_CSV, MANIFEST_JSON, read_manifest
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg", ".npy")
SERIES_TAGS = ["SeriesInstanceUID", "Modality", "Rows"]


def dicom_image(path: Path) -> tuple[str, str | None] | None:
    """(SeriesInstanceUID, Modality) of a DICOM image file; None for anything else (not DICOM,
    unreadable, or DICOM without pixels such as a DICOMDIR).

    The DICM marker is the test MONAI's reader applies to a folder's files.
    """
    try:
        if not path.is_file() or not is_dicom(path):
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=SERIES_TAGS)
    except Exception:  # unreadable: then not a slice MONAI's reader would take either
        return None
    if "Rows" not in ds:
        return None
    return str(ds.get("SeriesInstanceUID") or ""), str(ds.get("Modality") or "") or None


def stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_cases(
    inputs: list[Path], cfg: RunConfig, skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """Every study named by `inputs`, in order, each with a name no other case has (a name
    met again gets the first free -2, -3 suffix). What cannot be a study is recorded in
    `skipped` (the input -> why)."""
    cases: list[dict[str, Any]] = []
    for given in inputs:
        path = given.expanduser()
        if not path.exists():
            skipped[str(path)] = "no such file or folder"
        elif path.is_dir() and any((path / m).is_file() for m in (MANIFEST_JSON, MANIFEST_CSV)):
            cases += _site_cases(path, cfg, skipped)
        elif path.is_dir():
            cases += _folder_cases(path, skipped, nested=False)
        else:
            cases.append(_path_case(path))
    taken: set[str] = set()
    for case in cases:
        name, number = case["name"], 1
        while case["name"] in taken:
            number += 1
            case["name"] = f"{name}-{number}"
        taken.add(case["name"])
    return cases


def _folder_cases(folder: Path, skipped: dict[str, str], nested: bool) -> list[dict[str, Any]]:
    """A folder's studies. Its DICOM images by series: one series of several files is the
    folder itself (MONAI reads a folder as one volume, skipping non-DICOM files); a series of
    one file is that file. Every other entry is a study of its own, and a folder in the
    folder is read the same way, one level deep."""
    series: dict[str, list[Path]] = {}
    modality: dict[str, str | None] = {}
    cases: list[dict[str, Any]] = []
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        skipped[str(folder)] = "an empty folder"
    for entry in entries:
        found = dicom_image(entry)
        if found is not None:
            series.setdefault(found[0], []).append(entry)
            modality[found[0]] = found[1]
        elif entry.is_dir() and nested:
            skipped[str(entry)] = "a folder two levels down: give it as an --input of its own"
        elif entry.is_dir():
            cases += _folder_cases(entry, skipped, nested=True)
        else:
            cases.append(_case(entry, None))
    for uid, files in series.items():
        if len(files) == 1:
            cases.append(_case(files[0], (uid, modality[uid])))
        elif len(series) == 1:
            cases.append(_case(folder, (uid, modality[uid]), sources=files))
        else:  # MONAI reads a folder whole: one series of several must have a folder of its own
            skipped[f"{folder} (series {uid})"] = (
                f"one of {len(series)} DICOM series in this folder ({len(files)} files from "
                f"{files[0].name}); a series is read from a folder holding it alone"
            )
    return cases


def _case(
    path: Path,
    dicom: tuple[str, str | None] | None,
    name: str | None = None,
    sources: list[Path] | None = None,
) -> dict[str, Any]:
    """One study; `dicom` is its (series, modality) when it is DICOM, `sources` its files."""
    return {
        "image": str(path),
        "input": str(path),
        "name": name or stem(path) or path.resolve().name,  # `--input .` is named too
        "modality": dicom[1] if dicom else None,
        "sources": [str(p) for p in sources or [path]] if dicom else [],
    }


def _site_cases(root: Path, cfg: RunConfig, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Every labelled image a site folder's manifest lists (all splits), named by its path
    there (the manifest's own checks apply: its problems are the training run's too, and
    each refused entry is recorded in `skipped`)."""
    root = root.resolve()  # the manifest's paths must lie inside it, as in training
    manifest = read_manifest(
        root, TASKS[cfg.task].label_kind, len(cfg.classes), cfg.max_image_megabytes
    )
    for problem in manifest.problems:
        skipped[f"{root} ({problem.where})"] = problem.reason
    cases = []
    for entries in manifest.splits.values():
        for entry in entries:
            relative = Path(entry["where"])
            case = _path_case(
                Path(entry["image"]), "__".join((*relative.parent.parts, stem(relative)))
            )
            cases.append({**case, "modality": manifest.modality or case["modality"]})
    return cases


def _path_case(path: Path, name: str | None = None) -> dict[str, Any]:
    """A file, or a folder taken as one DICOM series (a site's entry), as a case."""
    if not path.is_dir():
        return _case(path, dicom_image(path), name)
    slices = [p for p in sorted(path.iterdir()) if dicom_image(p)]
    return _case(path, dicom_image(slices[0]) if slices else None, name, slices)
