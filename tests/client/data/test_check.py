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


def _csv_site(folder, labels):
    """A CSV-manifest site of small PNG X-rays (image,label columns, no task named)."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i, label in enumerate(labels):
        pixels = rng.integers(0, 255, (32, 32), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"x{i}.png")
        rows.append(f"images/x{i}.png,{label}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_check_infers_classification_from_integer_csv_labels(tmp_path, capsys):
    from medfed.client.data.check import run_check

    site = _csv_site(tmp_path / "site", [0, 1, 2, 1, 0, 2, 1, 0])
    assert run_check(site, None, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    line = "task classification: inferred from the integer labels in manifest.csv"
    assert printed.count(line) == 1
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["usable"] and report["task"] == "classification"
    assert sum(report["label-histogram"].values()) == 8


def test_check_infers_regression_from_decimal_csv_labels(tmp_path, capsys):
    from medfed.client.data.check import check_site, print_report

    site = _csv_site(tmp_path / "site", [12.5, 30, 47.25, 60, 81.0, 99.5])
    report = check_site(site)
    print_report(report)
    assert "task regression: inferred from the non-integer labels" in capsys.readouterr().out
    assert report["usable"] and report["task"] == "regression"
    assert report["label-range"][0] == 12.5 and report["label-range"][2] == 99.5


def test_check_still_names_labels_it_cannot_infer_a_task_from(tmp_path):
    from medfed.client.data.check import check_site

    site = _csv_site(tmp_path / "site", [0, 1, "covid", 1])
    report = check_site(site)
    assert not report["usable"]
    assert report["blocking"] == [
        f"{site}: cannot tell the task (manifest.csv names none and its labels are not all "
        "numbers: 'covid'); pass --task segmentation|segmentation3d|classification|regression|gan"
    ]
    assert check_site(site, "classification")["counts"]["skipped"] == 1  # --task still decides


def test_check_without_out_writes_nothing_where_it_runs(tmp_path, monkeypatch, capsys):
    """Issue 25: `data check` without --out wrote data-check-<site>/ into the current folder."""
    from medfed.server.cli import main

    site = _csv_site(tmp_path / "site", [0, 1, 2, 1, 0, 2, 1, 0])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["data", "check", str(site)]) == 0
    assert list(here.iterdir()) == []
    assert "--out DIR writes this report" in capsys.readouterr().out
