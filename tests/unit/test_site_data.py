import json
import shutil

import pytest

from medfed.client.site_data import SiteDataError, load_site
from tests.conftest import tiny_config


@pytest.fixture
def site(tmp_path, seg_sites):
    copy = tmp_path / "site"
    shutil.copytree(seg_sites / "site-0", copy)
    return copy


def _edit(site, change):
    manifest = json.loads((site / "dataset.json").read_text())
    change(manifest)
    (site / "dataset.json").write_text(json.dumps(manifest))


def test_valid_site_splits_deterministically(site):
    cfg = tiny_config()
    first, second = load_site(site, cfg), load_site(site, cfg)
    assert first.val == second.val and first.train == second.train
    assert len(first.val) == round(0.2 * (len(first.train) + len(first.val)))
    assert not {e["image"] for e in first.val} & {e["image"] for e in first.train}


def test_missing_manifest(tmp_path):
    with pytest.raises(SiteDataError, match=r"no dataset\.json or manifest\.csv"):
        load_site(tmp_path, tiny_config())


def test_malformed_json_names_the_file(site):
    (site / "dataset.json").write_text("{not json")
    with pytest.raises(SiteDataError, match=r"dataset.json: not valid JSON"):
        load_site(site, tiny_config())


def test_missing_training_key(site):
    _edit(site, lambda m: m.pop("training"))
    with pytest.raises(SiteDataError, match="'training' must be a list"):
        load_site(site, tiny_config())


def test_missing_image_names_the_file(site):
    (site / "imagesTr" / "case_0003.nii.gz").unlink()
    with pytest.raises(SiteDataError, match=r"entry 3: file .*case_0003.nii.gz does not exist"):
        load_site(site, tiny_config())


def test_path_outside_the_site_is_refused(site):
    _edit(site, lambda m: m["training"][0].update(image="../../etc/passwd"))
    with pytest.raises(SiteDataError, match="points outside the site folder"):
        load_site(site, tiny_config())


def test_labels_must_match_the_run(site):
    with pytest.raises(SiteDataError, match="do not match the run's classes"):
        load_site(site, tiny_config(class_names="background,tumour"))


def test_classification_label_out_of_range(tmp_path, cls_sites):
    site = tmp_path / "cls"
    shutil.copytree(cls_sites / "site-0", site)
    _edit(site, lambda m: m["training"][2].update(label=7))
    with pytest.raises(SiteDataError, match=r"entry 2: label 7 outside 0\.\.2"):
        load_site(site, tiny_config(task="classification"))


def test_csv_manifest(tmp_path, cls_sites):
    site = tmp_path / "csv"
    shutil.copytree(cls_sites / "site-0", site)
    entries = json.loads((site / "dataset.json").read_text())["training"]
    (site / "dataset.json").unlink()
    rows = ["image,label,split"] + [f"{e['image']},{e['label']},train" for e in entries]
    (site / "manifest.csv").write_text("\n".join([*rows, "imagesTr/x.png,0,test"]) + "\n")
    loaded = load_site(site, tiny_config(task="classification"))
    assert len(loaded.train) + len(loaded.val) == len(entries)
