import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from medfed.client.synthetic import generate_federation, generate_site


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
