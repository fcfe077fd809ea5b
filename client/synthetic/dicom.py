"""Writing DICOM files with pydicom: single images and slice series.

Used by the synthetic X-ray generators and the reader tests, so that the
DICOM path (modality tags, pixel spacing, rescale, slice positions) is
exercised by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SOP_CLASS = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": ComputedRadiographyImageStorage,
}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    modality: str,
    spacing: tuple[float, float],
    position_z: float = 0.0,
    instance: int = 1,
    rescale: tuple[float, float] = (1.0, 0.0),
    uid_seed: str | None = None,
    slice_thickness: float = 1.0,
) -> Path:
    """One 2D slice; `pixels` are stored values (int16/uint16), rows x columns.

    `rescale` is (slope, intercept): readers report stored * slope + intercept.
    With `uid_seed` the UIDs derive from it, so the same seed writes the same bytes.
    """

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=[uid_seed, role]) if uid_seed else generate_uid()

    instance_uid = uid(f"instance-{instance}" if instance > 1 else "instance")
    sop_class = SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.PatientID, ds.PatientName = "SYNTHETIC", "Synthetic^Patient"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName, ds.Manufacturer = "", "medfed-synthetic"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = slice_thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    signed = pixels.dtype.kind == "i"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_radiograph(
    path: Path, image: np.ndarray, modality: str, spacing: float, uid_seed: str
) -> Path:
    """A radiograph with values in [0, 1.3] (scanner effects included), stored as 12 bits."""
    stored = (np.clip(image / 1.3, 0.0, 1.0) * 4095).round().astype(np.uint16)
    return write_dicom(path, stored, modality, (spacing, spacing), uid_seed=uid_seed)
