"""Site folders: fatal manifest errors, and per-file problems that are skipped and counted."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medfed.client.data import scan
from medfed.client.data.site import SiteDataError, load_site
from tests.conftest import tiny_config


@pytest.fixture
def site(tmp_path, seg_sites):
    copy = tmp_path / "site"
    shutil.copytree(seg_sites / "site-0", copy)
    return copy


@pytest.fixture
def cls_site(tmp_path, cls_sites):
    copy = tmp_path / "cls"
    shutil.copytree(cls_sites / "site-0", copy)
    return copy


def _edit(site, change):
    manifest = json.loads((site / "dataset.json").read_text())
    change(manifest)
    (site / "dataset.json").write_text(json.dumps(manifest))


def _entries(site):
    return json.loads((site / "dataset.json").read_text())["training"]


def _skipped(loaded):
    return {p.where: p.reason for p in loaded.problems}


def test_valid_site_splits_deterministically(site):
    cfg = tiny_config()
    first, second = load_site(site, cfg), load_site(site, cfg)
    assert [e["where"] for e in first.val] == [e["where"] for e in second.val]
    total = len(first.train) + len(first.val)
    assert total == len(_entries(site)) and first.problems == []
    assert len(first.val) == round(0.2 * total)
    assert not {e["image"] for e in first.val} & {e["image"] for e in first.train}
    assert first.modality == "MR"


# -- fatal: the site cannot be used at all ---------------------------------------------


def test_empty_folder(tmp_path):
    with pytest.raises(SiteDataError, match="is empty"):
        load_site(tmp_path, tiny_config())


def test_folder_without_manifest(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SiteDataError, match=r"no dataset\.json, manifest\.csv or MedMNIST"):
        load_site(tmp_path, tiny_config())


def test_malformed_json_names_the_file(site):
    (site / "dataset.json").write_text("{not json")
    with pytest.raises(SiteDataError, match=r"dataset\.json: not valid JSON"):
        load_site(site, tiny_config())


def test_missing_training_key(site):
    _edit(site, lambda m: m.pop("training"))
    with pytest.raises(SiteDataError, match="'training' must be a list"):
        load_site(site, tiny_config())


def test_labels_must_match_the_run(site):
    with pytest.raises(SiteDataError, match="do not match the run's classes"):
        load_site(site, tiny_config(class_names="background,tumour"))


def test_nothing_usable_left(site):
    for image in (site / "imagesTr").iterdir():
        image.write_bytes(b"truncated")
    with pytest.raises(SiteDataError, match=r"not enough usable data.*corrupt or truncated NIfTI"):
        load_site(site, tiny_config())


# -- per file: skipped with the reason, training continues --------------------------------


def test_missing_image_is_skipped(site):
    (site / "imagesTr" / "case_0003.nii.gz").unlink()
    loaded = load_site(site, tiny_config())
    assert _skipped(loaded) == {
        "dataset.json train entry 3": "imagesTr/case_0003.nii.gz does not exist"
    }
    assert len(loaded.train) + len(loaded.val) == len(_entries(site)) - 1


def test_path_outside_the_site_is_skipped(site):
    _edit(site, lambda m: m["training"][0].update(image="../../etc/passwd"))
    reasons = _skipped(load_site(site, tiny_config()))
    assert (
        reasons["dataset.json train entry 0"] == "../../etc/passwd points outside the site folder"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x1f\x8b\x08\x00 truncated gzip", "corrupt or truncated NIfTI file"),
        (b"", "corrupt or truncated NIfTI file"),
    ],
)
def test_corrupt_nifti_is_skipped(site, payload, reason):
    (site / "imagesTr" / "case_0001.nii.gz").write_bytes(payload)
    assert _skipped(load_site(site, tiny_config())) == {
        "imagesTr/case_0001.nii.gz": f"unreadable image: {reason}"
    }


def test_truncated_nifti_keeps_its_header_but_is_skipped(site):
    raw = nib.load(site / "imagesTr" / "case_0002.nii.gz").to_bytes()
    (site / "imagesTr" / "case_0002.nii").write_bytes(raw[: len(raw) // 2])
    _edit(site, lambda m: m["training"][2].update(image="imagesTr/case_0002.nii"))
    reasons = _skipped(load_site(site, tiny_config()))
    assert reasons["imagesTr/case_0002.nii"].startswith("unreadable image")


def test_a_compressed_nifti_cut_short_is_said_to_be_truncated(site):
    """Its header reads; the decompression runs out of bytes (EOFError), as a copy cut off
    by a full disk or an interrupted transfer leaves it."""
    whole = (site / "imagesTr" / "case_0002.nii.gz").read_bytes()
    (site / "imagesTr" / "case_0002.nii.gz").write_bytes(whole[: len(whole) // 2])
    assert _skipped(load_site(site, tiny_config()))["imagesTr/case_0002.nii.gz"] == (
        "unreadable image: corrupt or truncated NIfTI file"
    )


def test_corrupt_png_is_skipped(cls_site):
    (cls_site / "imagesTr" / "case_0004.png").write_bytes(b"\x89PNG\r\n\x1a\n-garbage-")
    _edit(cls_site, lambda m: m["training"][4].update(image="imagesTr/case_0004.png"))
    reasons = _skipped(load_site(cls_site, tiny_config(task="classification")))
    assert reasons == {"imagesTr/case_0004.png": "unreadable image: corrupt or truncated PNG file"}


def test_non_image_file_is_skipped(cls_site):
    (cls_site / "imagesTr" / "notes.txt").write_text("not an image")
    _edit(cls_site, lambda m: m["training"][0].update(image="imagesTr/notes.txt"))
    reasons = _skipped(load_site(cls_site, tiny_config(task="classification")))
    assert reasons["imagesTr/notes.txt"].startswith("unreadable image: not an image file (.txt")


def test_corrupt_dicom_is_skipped(cls_site):
    (cls_site / "imagesTr" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM\x02\x00")
    _edit(cls_site, lambda m: m["training"][1].update(image="imagesTr/broken.dcm"))
    reasons = _skipped(load_site(cls_site, tiny_config(task="classification")))
    assert reasons["imagesTr/broken.dcm"].startswith("unreadable image")


def test_image_label_shape_mismatch_is_skipped(site):
    label = site / "labelsTr" / "case_0005.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.uint8), np.eye(4)), label)
    assert _skipped(load_site(site, tiny_config())) == {
        "imagesTr/case_0005.nii.gz": "image shape (32, 32) differs from label shape (16, 16)"
    }


def test_label_outside_declared_labels_is_skipped(site):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 5
    nib.save(nib.Nifti1Image(mask, np.eye(4)), site / "labelsTr" / "case_0006.nii.gz")
    assert _skipped(load_site(site, tiny_config())) == {
        "imagesTr/case_0006.nii.gz": "label values [5] outside the declared labels 0..2"
    }


def test_class_label_out_of_range_is_skipped(cls_site):
    _edit(cls_site, lambda m: m["training"][2].update(label=7))
    reasons = _skipped(load_site(cls_site, tiny_config(task="classification")))
    assert reasons == {"dataset.json train entry 2": "label 7 outside 0..2"}


def test_duplicates_are_skipped(cls_site):
    shutil.copy(cls_site / "imagesTr" / "case_0000.dcm", cls_site / "imagesTr" / "copy.dcm")
    _edit(cls_site, lambda m: m["training"].append({"image": "imagesTr/copy.dcm", "label": 0}))
    reasons = _skipped(load_site(cls_site, tiny_config(task="classification")))
    assert reasons == {"imagesTr/copy.dcm": "duplicate of imagesTr/case_0000.dcm"}


def test_csv_manifest_with_declared_validation(cls_site):
    entries = _entries(cls_site)
    (cls_site / "dataset.json").unlink()
    splits = ["val" if i % 4 == 0 else "train" for i in range(len(entries))]
    rows = ["image,label,split"] + [
        f"{e['image']},{e['label']},{s}" for e, s in zip(entries, splits, strict=True)
    ]
    (cls_site / "manifest.csv").write_text("\n".join(rows) + "\n")
    loaded = load_site(cls_site, tiny_config(task="classification"))
    assert len(loaded.val) == splits.count("val")
    assert len(loaded.train) == splits.count("train")


def test_scan_results_are_cached_until_a_file_changes(site, tmp_path, monkeypatch):
    calls = []
    original = scan.Scanner._inspect
    monkeypatch.setattr(
        scan.Scanner,
        "_inspect",
        lambda self, entry: calls.append(entry["where"]) or original(self, entry),
    )
    cache = tmp_path / "cache"
    load_site(site, tiny_config(), cache_dir=cache)
    assert len(calls) == len(_entries(site))
    calls.clear()
    load_site(site, tiny_config(), cache_dir=cache)
    assert calls == []
    image = site / "imagesTr" / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), image)
    load_site(site, tiny_config(), cache_dir=cache)
    assert calls == ["imagesTr/case_0000.nii.gz"]
