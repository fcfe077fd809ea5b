"""Synthetic hospitals: deterministic, different per site, and in the formats real sites use."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfed.client.data.site import load_site
from medfed.client.synthetic import generate_federation, generate_site
from medfed.client.synthetic.hand_xray import hand_xray
from tests.conftest import tiny_config


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "dataset.json":
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_deterministic_by_seed(tmp_path, task):
    a = generate_site(task, 0, tmp_path / "a", seed=5, images_per_site=10, image_size=32)
    b = generate_site(task, 0, tmp_path / "b", seed=5, images_per_site=10, image_size=32)
    c = generate_site(task, 0, tmp_path / "c", seed=6, images_per_site=10, image_size=32)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_classification_sites_differ_in_size_labels_and_scanner(cls_sites):
    sizes, histograms, brightness = [], [], []
    for site in sorted(cls_sites.iterdir()):
        manifest = json.loads((site / "dataset.json").read_text())
        labels = [e["label"] for e in manifest["training"]]
        sizes.append(len(labels))
        histograms.append(np.bincount(labels, minlength=3) / len(labels))
        assert set(labels) == {0, 1, 2}, "every class occurs at every site"
        brightness.append(manifest["synthetic"]["profile"]["intensity_scale"])
    assert len(set(sizes)) > 1
    assert max(abs(histograms[0] - h).max() for h in histograms[1:]) > 0.1
    assert max(brightness) - min(brightness) > 0.1


def test_segmentation_sites_write_matching_nifti_pairs(seg_sites):
    means = []
    for site in sorted(seg_sites.iterdir()):
        entries = json.loads((site / "dataset.json").read_text())["training"]
        image = nib.load(site / entries[0]["image"]).get_fdata()
        label = nib.load(site / entries[0]["label"]).get_fdata()
        assert image.shape == label.shape == (32, 32)
        assert set(np.unique(label)) <= {0, 1, 2}
        lesions = [np.any(nib.load(site / e["label"]).get_fdata() > 0) for e in entries]
        assert 0 < sum(lesions) < len(lesions), "some slices with lesions, some without"
        means.append(np.mean([nib.load(site / e["image"]).get_fdata().mean() for e in entries]))
    assert max(means) - min(means) > 0.02, "scanner effects differ between sites"


def test_refuses_to_overwrite_a_different_site(tmp_path):
    generate_federation("segmentation", 1, tmp_path, seed=0, images_per_site=8, image_size=32)
    with pytest.raises(FileExistsError, match="site-0"):
        generate_federation("segmentation", 1, tmp_path, seed=1, images_per_site=8, image_size=32)


def test_hand_xray_site_is_dicom_with_age_labels(tmp_path):
    site = generate_site(
        "regression", 0, tmp_path / "site", seed=0, images_per_site=10, image_size=32
    )
    manifest = json.loads((site / "dataset.json").read_text())
    first = manifest["training"][0]
    ds = pydicom.dcmread(site / first["image"])
    assert ds.Modality == "DX" and float(ds.PixelSpacing[0]) == pytest.approx(200 / 32)
    loaded = load_site(site, tiny_config(task="regression"))
    assert loaded.modality == "DX" and not loaded.problems
    assert all(6 <= e["label"] <= 216 for e in loaded.train)
    assert isinstance(loaded.train[0]["label"], float)


def test_skeletal_maturity_grows_with_age():
    young, old = (hand_xray(np.random.default_rng(0), 64, age) for age in (12, 200))
    assert (old > 0.6).sum() > 1.5 * (young > 0.6).sum()  # more and bigger bone


def test_chest_xray_sites_are_dicom(cls_sites):
    entry = json.loads((cls_sites / "site-0" / "dataset.json").read_text())["training"][0]
    assert pydicom.dcmread(cls_sites / "site-0" / entry["image"]).Modality == "CR"


def test_brats_like_volumes_have_four_channels_and_nested_regions(tmp_path):
    site = generate_site(
        "segmentation3d", 0, tmp_path / "s", seed=0, images_per_site=8, image_size=16
    )
    cfg = tiny_config(task="segmentation3d", image_size=16)
    loaded = load_site(site, cfg)
    assert cfg.in_channels == 4 and not loaded.problems
    fact = next(f for f in loaded.facts.values() if len(f["label-values"]) == 4)
    assert fact["shape"] == [16, 16, 16] and fact["channels"] == 4


def test_class_prevalence_override_makes_a_class_rare(tmp_path):
    site = generate_site(
        "classification",
        0,
        tmp_path / "s",
        seed=0,
        images_per_site=120,
        image_size=32,
        class_prevalence=(0.6, 0.38, 0.02),
    )
    labels = [e["label"] for e in json.loads((site / "dataset.json").read_text())["training"]]
    assert labels.count(2) <= 0.08 * len(labels) < labels.count(0)
    with pytest.raises(ValueError, match="needs 3 values summing to 1"):
        generate_site("classification", 1, tmp_path / "t", class_prevalence=(0.5, 0.5))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_generated_dicom_reads_back_with_its_pixel_data(tmp_path, task):
    from medfed.client.data.scan import Scanner, ScanSpec

    site = generate_site(task, 0, tmp_path / "s", seed=3, images_per_site=8, image_size=32)
    entry = json.loads((site / "dataset.json").read_text())["training"][0]
    stored = pydicom.dcmread(site / entry["image"]).pixel_array
    assert stored.dtype == np.uint16 and 0 < stored.max() <= 4095
    read = Scanner(ScanSpec("class", 3, 2, 1), None)._load(str(site / entry["image"]))
    np.testing.assert_array_equal(read[0].numpy(), stored.T.astype(np.float32))


def test_every_task_with_site_data_has_a_synthetic_generator():
    from medfed.client.synthetic import GENERATORS
    from medfed.shared_models.task_descriptions import SITE_DATA_TASKS

    assert set(GENERATORS) == set(SITE_DATA_TASKS)  # `medfed synth --task` offers these
