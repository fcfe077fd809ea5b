"""A segmentation study's image and its DICOM SEG as one NIfTI pair on one grid.

The SEG's frames are read per source instance (highdicom), in the order the image's
slices are stacked here (along the slice normal), so the mask cannot be shifted or
flipped against the image whatever order the PACS sent them in; both are written with
the affine the DICOM geometry gives (LPS turned to NIfTI's RAS). Stacking the slices
and the affine is written by hand: MONAI's series reader does not say in which order it
stacked them, which the mask needs.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SegMismatch(ValueError):
    """A SEG that does not fit its image: the study is skipped with this reason."""


def _sorted_slices(series: Path) -> list[pydicom.Dataset]:
    slices = [pydicom.dcmread(path) for path in sorted(series.glob("*.dcm"))]
    if len(slices) == 1:
        return slices
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(slices, key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))


def _affine(slices: list[pydicom.Dataset]) -> np.ndarray:
    """Voxel (column, row, slice) to patient RAS millimetres."""
    first = slices[0]
    row_cos, col_cos = np.reshape(np.asarray(first.ImageOrientationPatient, float), (2, 3))
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.get("ImagePositionPatient", [0.0, 0.0, 0.0]), float)
    if len(slices) > 1:
        step = np.asarray(slices[1].ImagePositionPatient, float) - origin
    else:
        step = np.cross(row_cos, col_cos) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_cos * col_spacing, col_cos * row_spacing, step
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def segment_names(seg_file: Path) -> tuple[str, ...]:
    """The SEG's segment labels, by segment number (1, 2, ...)."""
    seg = hd.seg.segread(seg_file)
    segments = sorted(seg.SegmentSequence, key=lambda s: int(s.SegmentNumber))
    return tuple(str(s.SegmentLabel) for s in segments)


def write_pair(series: Path, seg_file: Path, image_out: Path, label_out: Path) -> None:
    """The image series and its SEG as NIfTI files on the image's grid; SegMismatch when
    the SEG references other instances or another frame size."""
    slices = _sorted_slices(series)
    uids = [str(ds.SOPInstanceUID) for ds in slices]
    seg = hd.seg.segread(seg_file)
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for ref in seg.ReferencedSeriesSequence
        for item in ref.ReferencedInstanceSequence
    }
    if not referenced <= set(uids):
        raise SegMismatch(f"its SEG references {len(referenced - set(uids))} instances that "
                          "are not in the image series")  # fmt: skip
    if (int(seg.Rows), int(seg.Columns)) != (int(slices[0].Rows), int(slices[0].Columns)):
        raise SegMismatch(
            f"its SEG's frames are {seg.Rows}x{seg.Columns}, the image's slices "
            f"{slices[0].Rows}x{slices[0].Columns}: the SEG does not match its image's geometry"
        )
    mask = seg.get_pixels_by_source_instance(uids, combine_segments=True, dtype=np.uint8)
    image = np.stack([ds.pixel_array * float(ds.get("RescaleSlope", 1)) +
                      float(ds.get("RescaleIntercept", 0)) for ds in slices])  # fmt: skip
    affine = _affine(slices)
    # (slice, row, column) -> NIfTI's (column, row, slice)
    for array, path, dtype in ((image, image_out, np.float32), (mask, label_out, np.uint8)):
        path.parent.mkdir(parents=True, exist_ok=True)
        volume = np.transpose(array, (2, 1, 0)).astype(dtype)
        volume = volume[:, :, 0] if len(slices) == 1 else volume  # an X-ray: a 2D image
        nib.save(nib.Nifti1Image(volume, affine), path)
