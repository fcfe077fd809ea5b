"""Images whose headers lie about their size are skipped before a pixel is allocated.

The memory test scans in a subprocess and reads its peak resident memory
(VmHWM) before and after the scan: a 350-byte NIfTI declaring 1000³ floats
made the scanner allocate 4 GB, one declaring 65535³ ended in a bare
MemoryError.
"""

import gzip
import io
import json
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medfed.client.data.image_headers import declared, size_problem
from medfed.client.data.manifest import SiteDataError
from medfed.client.data.site import scan_site
from medfed.client.synthetic.dicom import write_dicom
from medfed.shared_models.config import ConfigError
from tests.conftest import tiny_config

SCAN_IN_A_CHILD = """
import json, sys
from pathlib import Path
from medfed.client.data.site import scan_site
from medfed.shared_models.config import RunConfig

def peak_kb():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1])

cfg = RunConfig.from_mapping({"task": "classification"})
before = peak_kb()
site = scan_site(Path(sys.argv[1]), cfg)
problems = [str(p) for p in site.problems]
print(json.dumps({"before": before, "after": peak_kb(), "problems": problems}))
"""


def _nifti_header_only(path, shape, header_class=nib.Nifti1Header):
    """A NIfTI holding only a header that declares `shape` float32 voxels (4 data bytes)."""
    header = header_class()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = len(header.binaryblock) + 4
    data = header.binaryblock + bytes(4)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _dicom_declaring(path, rows, columns, frames):
    """A real, small DICOM whose header then claims `frames` frames of rows x columns."""
    write_dicom(path, np.zeros((4, 4), np.int16), "CT", (1.0, 1.0))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.save_as(path)
    return path


def _npy_declaring(path, shape):
    """A .npy whose header declares `shape` float32 values and holds none."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
    return path


HOSTILE = {
    "nifti2-65535-cubed.nii": lambda p: _nifti_header_only(p, (65535,) * 3, nib.Nifti2Header),
    "nifti1-1000-cubed.nii.gz": lambda p: _nifti_header_only(p, (1000,) * 3),
    "dicom-65535-squared-1000-frames.dcm": lambda p: _dicom_declaring(p, 65535, 65535, 1000),
    "numpy-1000-cubed.npy": lambda p: _npy_declaring(p, (1000, 1000, 1000)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_lying_header_is_skipped_without_allocating_its_pixels(tmp_path, name):
    site = tmp_path / "site"
    site.mkdir()
    HOSTILE[name](site / name)
    manifest = {"task": "classification", "training": [{"image": name, "label": 0}]}
    (site / "dataset.json").write_text(json.dumps(manifest))
    child = subprocess.run(
        [sys.executable, "-c", SCAN_IN_A_CHILD, str(site)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(child.stdout.splitlines()[-1])
    grown_mb = (result["after"] - result["before"]) / 1024
    assert grown_mb < 64, f"the scan's peak memory grew by {grown_mb:.0f} MB"
    (problem,) = result["problems"]
    assert problem.startswith(f"{name}: image too large: header declares shape ")
    assert "'max-image-megabytes' = 1024" in problem


def test_the_limit_reads_each_formats_header(tmp_path):
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((300, 700), np.uint8)).save(png)
    nifti = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 80), np.int16), np.eye(4)), nifti)
    dicom = _dicom_declaring(tmp_path / "x.dcm", 512, 512, 2)
    assert declared(png).shape == (700, 300, 1)
    assert declared(nifti).shape == (64, 64, 80)
    assert declared(dicom).shape == (2, 512, 512, 1)
    # decoded as float32: 0.8 MB, 1.25 MB and 2 MB
    assert size_problem(png, 1) is None
    assert "shape 64x64x80, 1.25 MB decoded" in size_problem(nifti, 1)
    assert "shape 2x512x512x1, 2 MB decoded" in size_problem(dicom, 1)
    assert size_problem(dicom, 2) is None


def test_a_dicom_series_folder_counts_every_slice(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        _dicom_declaring(series / f"{k}.dcm", 256, 512, 1)
    assert declared(series).shape == (3, 256, 512, 1)


def test_a_file_without_a_header_is_left_to_the_reader(tmp_path):
    junk = tmp_path / "x.nii.gz"
    junk.write_bytes(b"not an image")
    assert declared(junk) is None
    assert size_problem(junk, 1) is None


def test_the_limit_is_a_run_config_key(tmp_path, cls_sites):
    cfg = tiny_config(task="classification", max_image_megabytes=1)
    site = scan_site(cls_sites / "site-0", cfg)
    assert site.train and not site.problems  # 32x32 images are far below 1 MB
    with pytest.raises(ConfigError, match="'max-image-megabytes' = 0"):
        tiny_config(max_image_megabytes=0)
    with pytest.raises(
        ConfigError, match=r"'max-image-megabytes' = 100000: expected an integer in 1\.\.16384"
    ):
        tiny_config(max_image_megabytes=100_000)


def test_an_npz_archive_is_checked_from_its_headers(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    images = np.zeros((2, 600, 600), np.float32)  # 1.4 MB per image
    np.savez(site / "data.npz", train_images=images, train_labels=np.zeros(2, np.int64))
    cfg = tiny_config(task="classification", max_image_megabytes=1)
    with pytest.raises(SiteDataError, match=r"images of shape 600x600, 1.373 MB each"):
        scan_site(site, cfg)


def test_an_npz_array_declaring_more_than_it_holds_is_refused(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    labels = tmp_path / "labels.npy"
    _npy_declaring(labels, (10**12,))
    with zipfile.ZipFile(site / "data.npz", "w") as archive:
        archive.writestr("train_images.npy", _npy_bytes(np.zeros((2, 8, 8), np.float32)))
        archive.write(labels, "train_labels.npy")
    cfg = tiny_config(task="classification")
    with pytest.raises(SiteDataError, match=r"'train_labels' declares shape 1000000000000 "):
        scan_site(site, cfg)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
