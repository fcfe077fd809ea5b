"""A federation root (`--data`, `data-root`): every sub-folder is a hospital, or an error."""

import json
import shutil

import numpy as np
import pytest

from medfed.client.data.manifest import SiteDataError
from medfed.client.data.site_paths import site_folders


@pytest.fixture
def root(tmp_path, cls_sites):
    copy = tmp_path / "federation"
    shutil.copytree(cls_sites, copy)
    return copy


def test_sites_come_in_natural_order_hidden_folders_and_files_aside(root):
    shutil.copytree(root / "site-2", root / "site-10")
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("three hospitals")
    assert [p.name for p in site_folders(root)] == ["site-0", "site-1", "site-2", "site-10"]


def test_an_empty_site_folder_is_an_error_naming_it(root):
    (root / "site-3").mkdir()
    with pytest.raises(SiteDataError, match=r"site folder .*site-3 is empty"):
        site_folders(root)


def test_a_site_folder_without_a_manifest_is_an_error_naming_it(root):
    (root / "hospital-b" / "imagesTr").mkdir(parents=True)
    with pytest.raises(SiteDataError, match=r"hospital-b: no dataset\.json, manifest\.csv"):
        site_folders(root)


def test_a_site_holding_only_a_medmnist_archive_is_a_site(tmp_path):
    site = tmp_path / "root" / "site-0"
    site.mkdir(parents=True)
    np.savez(site / "x.npz", train_images=np.zeros((2, 8, 8)), train_labels=np.zeros(2))
    assert site_folders(tmp_path / "root") == [site]


def test_a_root_without_site_folders_is_an_error(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(SiteDataError, match="holds no site folders"):
        site_folders(tmp_path)
