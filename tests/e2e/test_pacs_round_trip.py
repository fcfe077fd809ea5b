"""A hospital's whole PACS path against a real Orthanc (issue 26): cohorts pulled over
DICOMweb and DIMSE, a federation trained on them, the model's results pushed back (an SR
per X-ray over STOW-RS, a SEG per volume over C-STORE) and read back from the PACS,
each referencing the series it was made from."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tomli_w
from dicomweb_client.api import DICOMwebClient

from medfed.server.cli import main
from tests.client.test_predict import brain3d_run, held_out_cases
from tests.dicom_series import write_series
from tests.pacs import chest_study, orthanc

pytestmark = pytest.mark.e2e
TINY = ["-c", "image-size=32", "-c", "model-width=4", "-c", "model-depth=2",
        "-c", "batch-size=4", "-c", "stats-min-count=1"]  # fmt: skip


def _write_cohort(path, pacs, protocol, accessions=(), study_uids=(), labels=True):
    cohort = {
        "pacs": pacs.pacs_table(protocol),
        "query": {"accession-numbers": list(accessions), "study-uids": list(study_uids)},
    }
    if labels:
        cohort["labels"] = {"task": "classification", "csv": "labels.csv", "key-column": "acc",
                            "classes": ["normal", "pneumonia"]}  # fmt: skip
    path.write_text(tomli_w.dumps(cohort))
    return path


def _series(client: DICOMwebClient, modality: str) -> list[pydicom.Dataset]:
    found = client.search_for_series(search_filters={"Modality": modality})
    return [pydicom.Dataset.from_json(item) for item in found]


def test_pulled_cohorts_train_and_their_results_come_back_as_structured_reports(tmp_path):
    accessions = [f"ACC{i:03d}" for i in range(16)]
    rows = [f"{a},{'pneumonia' if i % 2 else 'normal'}" for i, a in enumerate(accessions)]
    (tmp_path / "labels.csv").write_text("acc,label\n" + "\n".join(rows) + "\n")
    with orthanc(tmp_path / "orthanc") as pacs:
        for i, accession in enumerate(accessions):
            for data in chest_study(accession, i % 2, seed=i):
                pacs.upload(data)
        first = _write_cohort(tmp_path / "a.toml", pacs, "dicomweb", accessions[:8])
        second = _write_cohort(tmp_path / "b.toml", pacs, "dimse", accessions[8:])
        for cohort, site in ((first, "site-a"), (second, "site-b")):
            assert main(["data", "pull", str(cohort), "--out", str(tmp_path / "sites" / site)]) == 0
        run = tmp_path / "run"
        trained = subprocess.run(
            [sys.executable, "-m", "medfed.server.cli", "simulate", "--data",
             str(tmp_path / "sites"), "--rounds", "1", "--out", str(run), *TINY],
            capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
        assert "task from the sites' dataset.json: classification" in trained.stdout
        out = tmp_path / "predicted"
        assert main(["predict", "--model", str(run), "--cohort", str(first), "--out", str(out),
                     "--push"]) == 0  # fmt: skip
        reports = _series(DICOMwebClient(pacs.dicomweb), "SR")
        ours = [s for s in reports if int(s.get("SeriesNumber", 0)) == 9901]
        assert len(ours) == 8, "one SR per study of the cohort"
        client = DICOMwebClient(pacs.dicomweb)
        for series in ours:
            (report,) = client.retrieve_series(series.StudyInstanceUID, series.SeriesInstanceUID)
            evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
            referenced = evidence.ReferencedSeriesSequence[0].SeriesInstanceUID
            study_series = client.search_for_series(series.StudyInstanceUID,
                                                    search_filters={"Modality": "CR"})  # fmt: skip
            cr = pydicom.Dataset.from_json(study_series[0])
            assert referenced == cr.SeriesInstanceUID, "the SR references its X-ray's series"
            items = {item.ConceptNameCodeSequence[0].CodeMeaning: item
                     for item in report.ContentSequence}  # fmt: skip
            assert items["Predicted class"].TextValue in ("normal", "pneumonia")
            assert "Probability of pneumonia" in items


def test_a_segmentation_comes_back_as_a_seg_referencing_its_volume(tmp_path):
    grey = brain3d_run(tmp_path / "grey", channels=1)
    image = held_out_cases(grey, count=1)[0][0].mean(axis=-1)
    stored = (np.transpose(image, (2, 1, 0)) * 1000).astype(np.int16)
    series = write_series(tmp_path / "series", stored, "MR", (1.5, 0.8, 2.5))
    with orthanc(tmp_path / "orthanc") as pacs:
        for path in sorted(series.iterdir()):
            pacs.upload(path.read_bytes())
        study = pydicom.dcmread(next(series.iterdir())).StudyInstanceUID
        cohort = _write_cohort(tmp_path / "c.toml", pacs, "dimse", study_uids=[study],
                               labels=False)  # fmt: skip
        out = tmp_path / "predicted"
        assert main(["predict", "--model", str(grey / "run"), "--cohort", str(cohort),
                     "--out", str(out), "--push"]) == 0  # fmt: skip
        client = DICOMwebClient(pacs.dicomweb)
        (seg_series,) = _series(client, "SEG")
        (seg,) = client.retrieve_series(study, seg_series.SeriesInstanceUID)
        sources = {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}
        mr_series = pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == mr_series
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert {r.ReferencedSOPInstanceUID for r in referenced} == sources
        assert seg.StudyInstanceUID == study, "filed in the volume's own study"
