"""`medfed data check` and the site statistics sent to the coordinator."""

import json
import shutil
import subprocess
import sys

import pytest

from medfed.client.data.site import load_site
from medfed.client.data.stats import HISTOGRAM_BINS, SUPPRESSED, site_statistics
from medfed.server.statistics import format_statistics
from tests.conftest import tiny_config


def _check(site, out):
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "data", "check", str(site), "--out", str(out)],
        capture_output=True,
        text=True,
    )


def test_check_reports_a_usable_site_with_its_problems(tmp_path, seg_sites):
    site = tmp_path / "site"
    shutil.copytree(seg_sites / "site-0", site)
    (site / "imagesTr" / "case_0001.nii.gz").write_bytes(b"broken")
    result = _check(site, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "skipped imagesTr/case_0001.nii.gz: unreadable image: corrupt or truncated NIfTI"
        in result.stdout
    )
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    total = len(json.loads((site / "dataset.json").read_text())["training"])
    assert report["usable"] is True
    assert report["counts"]["train"] + report["counts"]["val"] == total - 1
    assert report["counts"]["skipped"] == 1
    assert report["shapes"] == {"32x32": total - 1}
    assert set(report["label-coverage"]) == {"background", "edema", "tumour"}
    assert report["label-coverage"]["background"] == total - 1
    assert (tmp_path / "out" / "samples.png").stat().st_size > 1000


def test_check_lists_blocking_problems_and_fails(tmp_path, cls_sites):
    site = tmp_path / "site"
    shutil.copytree(cls_sites / "site-0", site)
    for image in (site / "imagesTr").iterdir():
        image.write_bytes(b"\x89PNG\r\n\x1a\n")
    result = _check(site, tmp_path / "out")
    assert result.returncode == 1
    assert "BLOCKING: not enough usable images" in result.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["usable"] is False
    assert len(report["problems"]) == report["counts"]["skipped"] > 0
    assert "Traceback" not in result.stderr


def test_check_of_a_folder_without_data(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _check(tmp_path / "empty", tmp_path / "out")
    assert result.returncode == 1
    assert "BLOCKING: site folder" in result.stdout and "is empty" in result.stdout


def test_statistics_suppress_small_counts_at_the_site(cls_sites):
    cfg = tiny_config(task="classification")
    site = load_site(cls_sites / "site-2", cfg)
    labels = [site.facts[e["where"]]["label"] for e in site.train + site.val]
    exact = site_statistics(site, cfg, min_count=1)
    assert exact["label-histogram"] == [labels.count(i) for i in range(3)]
    assert exact["num-train"] == len(site.train)
    assert sum(exact["intensity-histogram"]) == pytest.approx(1.0, abs=1e-3)
    threshold = sorted(labels.count(i) for i in range(3))[1]  # hides the rarest class
    guarded = site_statistics(site, cfg, min_count=threshold)
    for sent, true in zip(guarded["label-histogram"], exact["label-histogram"], strict=True):
        assert sent == (true if true >= threshold else SUPPRESSED)
    assert SUPPRESSED in guarded["label-histogram"]
    tiny = site_statistics(site, cfg, min_count=10_000)
    assert tiny["num-train"] == tiny["num-val"] == SUPPRESSED
    assert tiny["intensity-histogram"] == [float(SUPPRESSED)] * HISTOGRAM_BINS
    table = "\n".join(format_statistics({"site-2": guarded}, list(cfg.classes), threshold))
    assert f"<{threshold}" in table
