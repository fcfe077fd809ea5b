"""An image-level prediction (a class, or a value) as a DICOM Comprehensive SR that
references the image it was made from, so that the PACS files it in the same study and a
viewer shows it beside the image (highdicom builds and validates the SR).

The concepts are medfed's own, in a private coding scheme (99MEDFED): a predicted class
or value is not a finding a standard code names, and must not pass for one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import (
    CodedConcept,
    ContainerContentItem,
    NumContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.sr.codedict import codes

SCHEME = "99MEDFED"
SERIES_NUMBER = 9901  # where a viewer lists medfed's results, after the acquired series
# Type 2 attributes an SR copies from its evidence, which some images leave out.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime",
                 "AccessionNumber")  # fmt: skip


def _concept(code: str, meaning: str) -> CodedConcept:
    return CodedConcept(code[:16], SCHEME, meaning[:64])


def _items(row: dict[str, Any]) -> list[Any]:
    """The SR's content: the predicted class with each class's probability, or the value."""
    contains = RelationshipTypeValues.CONTAINS
    if "value" in row:
        return [NumContentItem(name=_concept("predicted-value", f"Predicted {row['quantity']}"),
                               value=float(row["value"]), unit=codes.UCUM.NoUnits,
                               relationship_type=contains)]  # fmt: skip
    items: list[Any] = [
        TextContentItem(name=_concept("predicted-class", "Predicted class"),
                        value=str(row["predicted"]), relationship_type=contains)
    ]  # fmt: skip
    for key, value in row.items():
        if key.startswith("probability-"):
            name = key.removeprefix("probability-")
            items.append(NumContentItem(
                name=_concept(f"p-{name}", f"Probability of {name}"), value=float(value),
                unit=codes.UCUM.NoUnits, relationship_type=contains,
            ))  # fmt: skip
    return items


def write_prediction_sr(row: dict[str, Any], source: Path, model: str, out: Path) -> Path:
    """The SR of one study's prediction `row` (predictions.csv's), made from `source`."""
    evidence = pydicom.dcmread(source, stop_before_pixels=True)
    for keyword in PATIENT_STUDY:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    root = ContainerContentItem(name=_concept("prediction", "medfed model prediction"))
    root.ContentSequence = _items(row)
    report = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfed",
        series_description=f"medfed prediction ({model})"[:64],
        is_complete=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report.save_as(out, enforce_file_format=True)
    return out
