"""An image's decoded size, from its header alone, before a single pixel is read.

A header is a claim: a 350-byte NIfTI may declare 1500³ float voxels, and
nibabel allocates the whole array (13 GB) before it finds the data missing;
a 65535³ one ends in a MemoryError. So each format's own library reads only
the header here (nibabel's lazy image, pydicom with `stop_before_pixels`,
PIL's lazy `open`, NumPy's .npy header) and the claim is checked against the
run's `max-image-megabytes` first. These are the parsers MONAI's readers use:
a header that does not parse here fails the same way in the reader, which
then reports the file as corrupt without allocating its pixels.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

# MONAI's LoadImage decodes every format to float32: narrower types grow to this.
DECODED_ITEMSIZE = 4
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]


@dataclass(frozen=True)
class Declared:
    """What a header says the image holds."""

    shape: tuple[int, ...]
    itemsize: int  # bytes per stored value

    @property
    def megabytes(self) -> float:
        """The size once decoded (as float32, or wider when stored wider), in MiB."""
        return math.prod(self.shape) * max(self.itemsize, DECODED_ITEMSIZE) / 2**20

    def describe(self) -> str:
        """The shape as an error message shows it: `65535x65535x65535`."""
        return "x".join(str(n) for n in self.shape)


def size_problem(source: str | Path, limit_megabytes: int) -> str | None:
    """Why `source` is too large to decode under the limit (None when it is not, or when
    no header can be read: the reader then reports the file itself)."""
    claim = declared(Path(source))
    if claim is None or claim.megabytes <= limit_megabytes:
        return None
    return (
        f"header declares shape {claim.describe()}, {claim.megabytes:.4g} MB decoded: over "
        f"the limit (config key 'max-image-megabytes' = {limit_megabytes}); not read"
    )


def declared(path: Path) -> Declared | None:
    """The largest decoded image any of MONAI's readers would make of `path`.

    MONAI tries its pydicom reader on every file, whatever its suffix, so the
    DICOM header counts for every file as well as the one its suffix names.
    """
    claims = [_dicom(path)]
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        claims.append(_nifti(path))
    elif name.endswith(PIL_SUFFIXES):
        claims.append(_pil(path))
    elif name.endswith(NUMPY_SUFFIXES):
        claims.append(_numpy(path))
    found = [c for c in claims if c is not None]
    return max(found, key=lambda c: c.megabytes) if found else None


def _nifti(path: Path) -> Declared | None:
    try:
        header = nib.load(path).header  # lazy: reads the header, never the data
        return Declared(
            tuple(int(n) for n in header.get_data_shape()), header.get_data_dtype().itemsize
        )
    except Exception:  # not a NIfTI header: NibabelReader refuses the file as well
        return None


def _pil(path: Path) -> Declared | None:
    try:
        with Image.open(path) as image:  # lazy: reads the header, never the pixels
            return Declared((*image.size, len(image.getbands())), 1)
    except Exception:  # not an image PIL opens (or a decompression bomb it refuses itself)
        return None


def _dicom(path: Path) -> Declared | None:
    """One DICOM file's frames; a folder is a series, every DICOM file in it a slice."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    claims = [c for c in map(_dicom_file, files) if c is not None]
    if not claims:
        return None
    if len(claims) == 1:
        return claims[0]
    slices = sum(math.prod(c.shape) for c in claims) // math.prod(claims[0].shape[1:])
    return Declared((slices, *claims[0].shape[1:]), max(c.itemsize for c in claims))


def _dicom_file(path: Path) -> Declared | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=DICOM_TAGS)
        shape = (
            int(ds.get("NumberOfFrames") or 1),
            int(ds.Rows),
            int(ds.Columns),
            int(ds.get("SamplesPerPixel") or 1),
        )
        return Declared(shape, max(1, int(ds.get("BitsAllocated") or 8) // 8))
    except Exception:  # not DICOM, or no image in it: PydicomReader refuses it as well
        return None


def _numpy(path: Path) -> Declared | None:
    """A .npy array, or every array of a .npz (NumpyReader loads them all)."""
    try:
        if path.name.lower().endswith(".npy"):
            with path.open("rb") as handle:
                return npy_header(handle)
        arrays = [claim for _, claim in npz_headers(path)]
    except Exception:  # not a NumPy file: NumpyReader refuses it as well
        return None
    if len(arrays) < 2:
        return arrays[0] if arrays else None
    values = sum(math.prod(a.shape) for a in arrays)
    return Declared((values,), max(a.itemsize for a in arrays))


def npy_header(handle: IO[bytes]) -> Declared:
    """Shape and item size of the .npy array `handle` starts with (nothing else read)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return Declared(tuple(int(n) for n in shape), dtype.itemsize)


def npz_headers(path: Path) -> Iterator[tuple[str, Declared]]:
    """Each array of a .npz by name, from the headers of its members."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as handle:
                    yield member.removesuffix(".npy"), npy_header(handle)
