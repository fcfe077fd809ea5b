"""A segmentation of DICOM input as a DICOM SEG object (highdicom), referencing its source.

PACS viewers (OHIF, 3D Slicer) open a SEG next to the series it references.
highdicom wants one mask frame per source instance, in that instance's own
rows and columns; the mask medfed holds is a volume in MONAI's voxel grid.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

# In voxels: how far a source pixel may sit from a voxel centre of the mask read from it.
GEOMETRY_TOLERANCE = 0.05

# DICOM patient coordinates are LPS; MONAI's affines are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def frames_for_instances(
    mask: np.ndarray, affine: np.ndarray, instances: list[pydicom.Dataset]
) -> np.ndarray:
    """(instances, rows, columns) of `mask` (spatial, indexed by `affine`, RAS).

    A 2D mask is one image's pixels as MONAI's reader holds them, (columns, rows):
    its frame needs no geometry, which projection radiographs (DX, CR) lack.
    Otherwise, hand-written: each source pixel's patient position (ImagePositionPatient
    + row/column steps) is mapped through the inverse affine to the nearest voxel,
    which makes no assumption about how the reader ordered slices or axes.
    """
    if mask.ndim == 2 and len(instances) == 1:
        return mask.T[None].astype(np.uint8)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=float))
    frames = np.zeros((len(instances), instances[0].Rows, instances[0].Columns), np.uint8)
    for n, ds in enumerate(instances):
        rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        lps = (
            np.asarray(ds.ImagePositionPatient, dtype=float)
            + cols[..., None] * col_spacing * orientation[:3]
            + rows[..., None] * row_spacing * orientation[3:]
        )
        exact = (lps @ LPS_TO_RAS.T) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        voxel = np.rint(exact).astype(int)
        index = tuple(voxel[..., axis] for axis in range(mask.ndim))
        inside = np.all(
            [(i >= 0) & (i < size) for i, size in zip(index, mask.shape, strict=True)], axis=0
        )
        # The mask was read from these very files: every pixel is a voxel centre of it.
        # Anything else means the tags' geometry is not the one the reader used (a value
        # it could not parse), and a SEG built from the tags would be misplaced.
        if not inside.all() or np.abs(exact - voxel).max() > GEOMETRY_TOLERANCE:
            raise ValueError(
                f"instance {ds.SOPInstanceUID}: its position and orientation tags do not "
                "match the geometry the image reader used; a SEG would be misplaced"
            )
        frames[n] = mask[index]
    return frames


def write_dicom_seg(
    mask: np.ndarray, affine: np.ndarray, sources: list[Path], classes: list[str], out: Path
) -> Path:
    """`out` (a DICOM SEG file): one segment per foreground class, referencing the DICOM
    images the study was read from (`sources`: one file, or a series' slices)."""
    instances = [pydicom.dcmread(path) for path in sources]
    frames = frames_for_instances(mask, affine, instances)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medfed", version=version("medfed"), family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(classes[1:], start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=instances,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfed",
        manufacturer_model_name="medfed predict",
        software_versions=version("medfed"),
        device_serial_number="none",
        omit_empty_frames=False,
    )
    seg.save_as(out)
    return out
