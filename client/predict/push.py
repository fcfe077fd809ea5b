"""`medfed predict --cohort FILE [--push]`: studies from the hospital's PACS in, results
back into it, as DICOM its viewers open: the SEG of a segmentation, an SR of a class or a
value, each referencing the study's own image series."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from medfed.client.pacs.cohort import Cohort
from medfed.client.pacs.pull import connect, pull
from medfed.client.predict.structured_report import write_prediction_sr

PULLED = "pulled"  # where --cohort's studies are retrieved, inside --out


def pull_inputs(cohort: Cohort, out: Path) -> Path:
    """The cohort's studies (its labels, if any, play no part) retrieved into `out`; the
    folder of their image series, one study each."""
    site = out / PULLED
    report = pull(replace(cohort, labels=None), site)
    print(f"pulled {report.retrieved} studies from the PACS into {site}"
          + (f" ({len(report.skipped)} skipped: see below)" if report.skipped else ""))  # fmt: skip
    for study, why in sorted(report.skipped.items()):
        print(f"  skipped {study}: {why}")
    return site / "imagesTr"


def push_results(cohort: Cohort, written: list[dict[str, Any]], out: Path, model: str) -> int:
    """Store every DICOM result in the cohort's PACS (an SR is written first for each
    image-level prediction made from DICOM); how many were stored. A result with no DICOM
    source (a NIfTI or PNG input) has nothing to reference and is listed as not pushed."""
    files: list[Path] = []
    for record in written:
        if "dicom-seg" in record:
            files.append(Path(record["dicom-seg"]))
        elif "row" in record and record.get("sources"):
            sr = out / "sr" / f"{record['name']}.dcm"
            record["dicom-sr"] = str(write_prediction_sr(record["row"], Path(record["sources"][0]),
                                                         model, sr))  # fmt: skip
            files.append(sr)
        else:
            record["not-pushed"] = "no DICOM source to reference"
    stored = 0
    if files:
        pacs = connect(cohort.pacs)
        try:
            stored = pacs.store(files)
        finally:
            pacs.close()
    for record in written:
        if "dicom-seg" in record or "dicom-sr" in record:
            record["pushed"] = True
    return stored
