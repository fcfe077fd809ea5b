"""Site manifests (dataset.json, manifest.csv, a MedMNIST .npz): any content is read or
refused with SiteDataError (or ConfigError for the task a dataset.json declares)."""

import csv
import io
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medfed.client.data.check import check_site, site_config
from medfed.client.data.manifest import SiteDataError, read_manifest
from medfed.shared_models.config import ConfigError
from tests.property.strategies import FAST, json_values

KINDS = st.sampled_from([("mask", 3), ("class", 3), ("value", 1)])
entries = st.lists(
    st.dictionaries(
        st.sampled_from(["image", "label", "x"]),
        st.one_of(json_values, st.sampled_from(["dataset.json", "../x", "/etc/passwd", ""])),
    ),
    max_size=4,
)
datasets = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"training": st.one_of(entries, json_values)},
        optional={
            "task": st.one_of(st.sampled_from(["classification", "regression"]), json_values),
            "labels": st.one_of(
                json_values, st.dictionaries(st.sampled_from(["0", "1", "x"]), json_values)
            ),
            "modality": json_values,
            "validation": st.one_of(entries, json_values),
            "test": st.one_of(entries, json_values),
        },
    ),
)


def _site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    return site


def _read(site, kind):
    try:
        manifest = read_manifest(site, *kind)
    except SiteDataError as err:
        assert str(err)
        return
    for split in manifest.splits.values():
        for entry in split:
            assert {"image", "label", "where"} <= set(entry)


@FAST
@given(data=st.one_of(datasets.map(lambda d: json.dumps(d).encode()), st.binary()), kind=KINDS)
def test_any_dataset_json_is_read_or_refused(tmp_path_factory, data, kind):
    site = _site(tmp_path_factory)
    (site / "dataset.json").write_bytes(data)
    _read(site, kind)
    try:
        site_config(site, None)
    except (SiteDataError, ConfigError) as err:
        assert str(err)


@FAST
@given(data=datasets.map(lambda d: json.dumps(d).encode()))
def test_data_check_reports_any_dataset_json(tmp_path_factory, data):
    site = _site(tmp_path_factory)
    (site / "dataset.json").write_bytes(data)
    report = check_site(site, "classification")
    assert report["usable"] is False or report["counts"]["train"] >= 1
    assert report["usable"] or all(isinstance(b, str) and b for b in report["blocking"])


cells = st.one_of(st.text(max_size=12), st.sampled_from(["train", "val", "Validation", "0", "-1"]))
rows = st.lists(st.lists(cells, max_size=4), max_size=5)
header = st.lists(st.sampled_from(["image", "label", "split", "", "x"]), max_size=4)


def _csv(head, body):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(head)
    writer.writerows(body)
    return text.getvalue().encode("utf-8", "surrogatepass")


@FAST
@given(data=st.one_of(st.builds(_csv, header, rows), st.binary()), kind=KINDS)
def test_any_manifest_csv_is_read_or_refused(tmp_path_factory, data, kind):
    site = _site(tmp_path_factory)
    (site / "manifest.csv").write_bytes(data)
    _read(site, kind)


@pytest.mark.parametrize(
    "data",
    [
        b"image,image,label\r\n,\x00\r\n",  # found by Hypothesis: a NUL byte in a path
        b"image,label\r\n" + b"a" * 300 + b".png,0\r\n",  # a name longer than the OS allows
    ],
)
def test_a_path_the_os_refuses_is_a_named_problem_not_a_crash(tmp_path, data):
    (tmp_path / "manifest.csv").write_bytes(data)
    for kind in (("mask", 3), ("class", 3)):
        _read(tmp_path, kind)


arrays = hnp.arrays(
    dtype=st.one_of(hnp.scalar_dtypes(), st.just(np.dtype("U3"))),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=3),
)
archives = st.dictionaries(
    st.sampled_from(["train_images", "train_labels", "val_images", "val_labels", "other"]),
    arrays,
    max_size=4,
)


def _npz(contents):
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    return buffer.getvalue()


@FAST
@given(data=st.one_of(archives.map(_npz), st.binary(max_size=200)), kind=KINDS)
def test_any_npz_archive_is_read_or_refused(tmp_path_factory, data, kind):
    site = _site(tmp_path_factory)
    (site / "data.npz").write_bytes(data)
    _read(site, kind)
