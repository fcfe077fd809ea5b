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


def series_problem(folder: Path) -> str | None:
    """Why the series in `folder` cannot be a site's image (None when it can)."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        return "no instances were retrieved"
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:  # any unreadable header: the whole series is unusable
            return f"an unreadable instance ({type(error).__name__})"
    for ds in headers:
        modality = str(ds.get("Modality", ""))
        if "Rows" not in ds or modality in NOT_IMAGES:
            return f"not an image series (modality {modality or '?'})"
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
