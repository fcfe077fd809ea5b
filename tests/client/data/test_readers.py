"""Every accepted format read through medfed's MONAI pipeline, from files the tests write."""

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medfed.client.data.loader import make_loader
from medfed.client.data.scan import Scanner, ScanSpec
from medfed.client.data.site import load_site
from medfed.client.data.transforms import site_transforms
from medfed.client.synthetic.dicom import write_dicom
from tests.conftest import tiny_config
from tests.dicom_series import write_series

CPU = torch.device("cpu")


def _read(path, spatial_dims=2):
    """What the scanner (and LoadImaged + EnsureChannelFirstd) sees: channel first."""
    return Scanner(ScanSpec("class", 3, spatial_dims, 1), None)._load(str(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path, suffix):
    data = np.random.default_rng(0).normal(size=(20, 24)).astype(np.float32)
    path = tmp_path / f"x{suffix}"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.8, 1.0, 1.0])), path)
    image = _read(path)
    assert image.shape == (1, 20, 24)
    np.testing.assert_array_equal(image[0].numpy(), data)
    assert tuple(round(float(v), 3) for v in image.pixdim[:2]) == (0.5, 0.8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_8_and_16_bit(tmp_path, dtype):
    top = np.iinfo(dtype).max
    data = np.linspace(0, top, 12 * 10).astype(dtype).reshape(12, 10)
    Image.fromarray(data).save(tmp_path / "x.png")
    image = _read(tmp_path / "x.png")
    # MONAI's PIL reader puts the width axis first, as the other readers do.
    np.testing.assert_array_equal(image[0].numpy(), data.T.astype(np.float32))


def test_jpeg_reads_within_compression_error(tmp_path):
    data = np.tile(np.linspace(0, 255, 32), (32, 1)).astype(np.uint8)
    Image.fromarray(data).save(tmp_path / "x.jpg", quality=95)
    image = _read(tmp_path / "x.jpg")
    assert image.shape == (1, 32, 32)
    assert float(np.abs(image[0].numpy() - data.T).mean()) < 3


def test_rgb_png_becomes_one_channel(tmp_path):
    data = np.zeros((16, 16, 3), np.uint8)
    data[..., 0] = 90
    data[..., 1] = 150
    Image.fromarray(data).save(tmp_path / "rgb.png")
    cfg = tiny_config(task="classification", image_size=16, intensity="none")
    out = site_transforms(cfg, "CR", train=False)({"image": str(tmp_path / "rgb.png"), "label": 0})
    assert out["image"].shape == (1, 16, 16)
    assert float(out["image"].mean()) == pytest.approx(80.0)


def test_single_dicom_round_trip_with_rescale(tmp_path):
    stored = np.arange(6 * 8, dtype=np.int16).reshape(6, 8) * 10
    path = write_dicom(tmp_path / "x.dcm", stored, "CT", (0.7, 0.6), rescale=(1.0, -1024.0))
    image = _read(path)
    assert image.shape == (1, 8, 6)  # columns first, like the other readers
    np.testing.assert_array_equal(image[0].numpy(), stored.T - 1024.0)
    assert pydicom.dcmread(path).Modality == "CT"


def test_dicom_series_is_one_volume_in_slice_order(tmp_path):
    volume = np.stack([np.full((6, 8), 100 * k, np.int16) for k in range(5)])
    folder = write_series(tmp_path / "series", volume, "CT", (0.7, 0.7, 2.0))
    shuffled = sorted(folder.iterdir(), key=lambda p: hash(p.name) % 7)
    for i, path in enumerate(shuffled):  # file names no longer follow slice order
        path.rename(folder / f"{i:02d}-{path.stem[::-1]}.dcm")
    image = _read(folder, spatial_dims=3)
    assert image.shape == (1, 8, 6, 5)
    assert [float(image[0, 0, 0, k]) for k in range(5)] == [0, 100, 200, 300, 400]
    assert [round(float(v), 3) for v in image.pixdim[:3]] == [0.7, 0.7, 2.0]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_sample_files(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0)
    )
    image = _read(path)
    assert image.shape == (1, ds.Columns, ds.Rows)
    np.testing.assert_allclose(image[0].numpy(), expected.T, rtol=1e-6)


def test_series_folder_is_refused_for_a_2d_task(tmp_path):
    site = tmp_path / "site"
    write_series(site / "imagesTr" / "s1", np.zeros((4, 8, 8), np.int16), "CT", (1, 1, 1))
    for k in range(3):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(site / "imagesTr" / f"{k}.png")
    entries = [{"image": f"imagesTr/{k}.png", "label": k} for k in range(3)]
    entries.append({"image": "imagesTr/s1", "label": 0})
    (site / "dataset.json").write_text(json.dumps({"training": entries}))
    loaded = load_site(site, tiny_config(task="classification"))
    assert {p.where: p.reason for p in loaded.problems} == {
        "imagesTr/s1": "expected a 2D image, found array shape (8, 8, 4)"
    }


def test_medmnist_npz_site(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "pneumoniamnist.npz",
        train_images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 3, (20, 1)),
        val_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1], [2], [0], [1], [9]]),
    )
    cfg = tiny_config(task="classification")
    site = load_site(tmp_path, cfg)
    assert (len(site.train), len(site.val)) == (20, 5)
    assert [p.reason for p in site.problems] == ["label 9 outside 0..2"]
    batch = next(iter(make_loader(site, site.train, cfg, train=True, device=CPU)))
    assert batch["image"].shape == (8, 1, 32, 32)
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0


def test_ct_sites_are_windowed_by_default(tmp_path):
    site = tmp_path / "ct"
    (site / "imagesTr").mkdir(parents=True)
    entries = []
    for k in range(4):
        hu = np.full((16, 16), -1024 + 600 * k, np.int16)  # air ... bone
        write_dicom(site / "imagesTr" / f"{k}.dcm", hu + 1024, "CT", (1, 1), rescale=(1.0, -1024.0))
        entries.append({"image": f"imagesTr/{k}.dcm", "label": k % 3})
    (site / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "training": entries}))
    cfg = tiny_config(task="classification", image_size=16, val_fraction=0.25)
    loaded = load_site(site, cfg)
    assert loaded.modality == "CT"
    values = sorted(
        float(site_transforms(cfg, "CT", train=False)(e)["image"].mean())
        for e in loaded.train + loaded.val
    )
    # -1024 HU clips to 0, then (HU + 1000) / 2000 inside the default window, 776 HU -> 0.888
    assert values == pytest.approx([0.0, (-424 + 1000) / 2000, (176 + 1000) / 2000, 0.888])


def test_a_modality_set_in_lower_case_is_the_dicom_code(tmp_path):
    """`modality = "ct"` in the run config is CT: windowed like a CT site, not scaled by
    percentiles (found by the predict/export review)."""
    site = tmp_path / "ct"
    (site / "imagesTr").mkdir(parents=True)
    entries = []
    for k in range(4):
        write_dicom(site / "imagesTr" / f"{k}.dcm", np.full((16, 16), 600 * k, np.int16), "CT",
                    (1, 1), rescale=(1.0, -1024.0))  # fmt: skip
        entries.append({"image": f"imagesTr/{k}.dcm", "label": k % 3})
    (site / "dataset.json").write_text(json.dumps({"training": entries}))
    cfg = tiny_config(task="classification", image_size=16, val_fraction=0.25, modality="ct")
    assert load_site(site, cfg).modality == "CT"
