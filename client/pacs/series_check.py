"""Whether a retrieved series is an image a site can train on: pixels, geometry, one grid.

Read from the headers only (pixels are not decoded): a series that is not an
image (a report, a presentation state, a SEG), that lacks the geometry a
volume needs, or whose instances disagree on their grid is skipped with the
reason, before anything is written into the site folder.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

# What one slice's grid is: every instance of a volume must agree on each.
GRID = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient")
VOLUME_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
# Series with rows and columns that are not images to train on: labels, reports, overlays.
NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"}


def series_problem(
    headers: list[pydicom.Dataset], study: str, series: str, expected: int = 0,
    max_megabytes: int = 1024,
) -> str | None:  # fmt: skip
    """Why a retrieved series (its instances' `headers`) cannot be a site's image (None
    when it can). Every instance must belong to the study and series asked for, and to one
    patient (a PACS, or whoever stands between, must not slip another patient's slices
    into a volume); `expected` instances (the PACS's own count, where it gave one) must all
    have come; no instance may declare more than `max_megabytes` of pixels (read from its
    header, never decoded: a compressed slice can declare gigabytes)."""
    foreign = _foreign(headers, study, series)
    if foreign:
        return foreign
    if expected and len(headers) != expected:
        return f"received {len(headers)} of the series' {expected} instances (cut off?)"
    if not headers:
        return "no instances were retrieved"
    return _image_problem(headers, max_megabytes)


def _foreign(headers: list[pydicom.Dataset], study: str, series: str) -> str | None:
    """Instances of another study, series or patient, by count (never by identifier)."""
    strays = sum(
        str(ds.get("StudyInstanceUID", "")) != study
        or str(ds.get("SeriesInstanceUID", "")) != series
        for ds in headers
    )
    if strays:
        return f"{strays} instances belong to another study or series than the one asked for"
    if len({str(ds.get("PatientID", "")) for ds in headers}) > 1:
        return "its instances name more than one patient"
    return None


def _image_problem(headers: list[pydicom.Dataset], max_megabytes: int) -> str | None:
    for ds in headers:
        modality = str(ds.get("Modality", ""))
        if "Rows" not in ds or modality in NOT_IMAGES:
            return f"not an image series (modality {modality or '?'})"
        declared = int(ds.Rows) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
        megabytes = declared * int(ds.get("BitsAllocated", 16)) / 8 / 2**20
        if megabytes > max_megabytes:
            return f"an instance declares {megabytes:.0f} MB of pixels (limit {max_megabytes})"
    if len(headers) == 1:
        return None
    for key in VOLUME_GEOMETRY:
        if any(key not in ds for ds in headers):
            return f"lacks geometry: {key} is missing, needed to stack {len(headers)} slices"
    for key in GRID:
        grids = {str(ds.get(key)) for ds in headers}
        if len(grids) > 1:
            shown = ", ".join(sorted(grids)[:2])
            return f"mixes geometries: {key} takes {len(grids)} values ({shown})"
    return None


def image_entry(folder: Path) -> Path:
    """What dataset.json names as the image: the file of a one-instance series (an X-ray),
    else the series folder (a volume MONAI reads as one image)."""
    files = sorted(folder.glob("*.dcm"))
    return files[0] if len(files) == 1 else folder
