"""A DICOM series on disk for the tests of the readers, predict and DICOM SEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from medfed.client.synthetic.dicom import write_dicom


def write_series(
    folder: Path, volume: np.ndarray, modality: str, spacing: tuple[float, float, float]
) -> Path:
    """A (slices, rows, columns) volume as one file per slice, one series."""
    folder.mkdir(parents=True, exist_ok=True)
    series_seed = generate_uid()  # one study, series and frame of reference for every slice
    for k, plane in enumerate(volume):
        write_dicom(
            folder / f"slice-{k:04d}.dcm",
            plane,
            modality,
            spacing[:2],
            position_z=k * spacing[2],
            instance=k + 1,
            uid_seed=series_seed,
            slice_thickness=spacing[2],
        )
    return folder
