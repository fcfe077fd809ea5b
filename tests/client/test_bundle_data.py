"""A bundle's datalist at one site: the site's own dataset.json, its split, its errors."""

from __future__ import annotations

import json

import pytest

from medfed.client.bundle_data import bundle_datalist
from medfed.client.data.manifest import SiteDataError
from tests.conftest import tiny_config

CFG = tiny_config(val_fraction=0.25, seed=3)


def test_the_datalist_is_the_sites_own_files_split_by_the_seed(seg_sites):
    site = seg_sites / "site-0"
    data = bundle_datalist(site, CFG)
    declared = json.loads((site / "dataset.json").read_text())["training"]
    entries = data.train + data.val
    assert sorted(e["image"] for e in entries) == sorted(str(site / e["image"]) for e in declared)
    assert all(e["label"].startswith(str(site / "labelsTr")) for e in entries)
    assert len(data.val) == round(len(declared) * 0.25)
    assert bundle_datalist(site, CFG) == data  # every message of a run: the same split
    other = bundle_datalist(site, tiny_config(val_fraction=0.25, seed=4))
    assert {e["image"] for e in other.val} != {e["image"] for e in data.val}


def test_a_declared_validation_list_is_used_as_it_is(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "training": [{"image": f"imagesTr/{i}.png", "label": i % 2} for i in range(4)],
                "validation": [{"image": "imagesTr/v.png", "label": 1}],
            }
        )
    )
    data = bundle_datalist(tmp_path, CFG)
    assert len(data.train) == 4
    assert data.val == [{"image": str(tmp_path / "imagesTr/v.png"), "label": 1}]
    assert data.train[1]["label"] == 1  # a class stays a class, not a path


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (None, "no dataset.json"),
        ("{broken", "dataset.json: not readable JSON"),
        ({"name": "x"}, "dataset.json: no 'training' list"),
        ({"training": [{"label": "a.nii.gz"}]}, "every 'training' entry needs an 'image' path"),
        ({"training": [{"image": "a.nii.gz"}]}, "not enough entries to train and validate"),
    ],
)
def test_an_unusable_datalist_is_named(tmp_path, content, named):
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(SiteDataError, match=named):
        bundle_datalist(tmp_path, CFG)
