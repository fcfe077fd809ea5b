"""`medfed data check`: what a site folder holds and whether a node can train on it."""

import json
import shutil
import subprocess
import sys

from medfed.client.synthetic import generate_site


def _check(site, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "data", "check", str(site), "--out", str(out),
         *extra],
        capture_output=True,
        text=True,
    )  # fmt: skip


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


def test_check_offers_every_task(tmp_path):
    """A hand X-ray site whose dataset.json says nothing of the task, checked as regression."""
    site = generate_site("regression", 0, tmp_path / "site", images_per_site=6, image_size=32)
    manifest = json.loads((site / "dataset.json").read_text())
    del manifest["task"]
    (site / "dataset.json").write_text(json.dumps(manifest))
    result = _check(site, tmp_path / "out", "--task", "regression")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["task"] == "regression" and report["modality"] == "DX"
    assert "label-range" in report
