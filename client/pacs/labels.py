"""Each study's label from a CSV the hospital keeps beside its PACS (its labels are mostly
not in the PACS): keyed by AccessionNumber or StudyInstanceUID."""

from __future__ import annotations

import csv
from dataclasses import dataclass

from medfed.client.pacs.cohort import CohortError, Labels


@dataclass(frozen=True)
class LabelTable:
    """The CSV's labels by key, and the class names (classification)."""

    by_key: dict[str, float | int]
    classes: tuple[str, ...]


def read_labels(labels: Labels) -> LabelTable:
    """The label of every row; CohortError naming the file, row and value on a bad one."""
    if labels.csv is None:
        raise CohortError("[labels] csv: the label file is needed")
    try:
        with labels.csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise CohortError(f"[labels] csv {labels.csv}: {error.strerror}") from error
    for column in (labels.keys_in, labels.column):
        if rows and column not in rows[0]:
            raise CohortError(f"[labels] csv {labels.csv}: no column {column!r}")
    raw = {row[labels.keys_in].strip(): row[labels.column].strip() for row in rows}
    if labels.task == "regression":
        return LabelTable(_numbers(labels, raw), ())
    classes = labels.classes or tuple(sorted(set(raw.values())))
    unknown = sorted(set(raw.values()) - set(classes))
    if unknown:
        raise CohortError(
            f"[labels] csv {labels.csv}: label {unknown[0]!r} is not one of the classes "
            f"{', '.join(classes)}"
        )
    return LabelTable({key: classes.index(value) for key, value in raw.items()}, classes)


def _numbers(labels: Labels, raw: dict[str, str]) -> dict[str, float | int]:
    numbers: dict[str, float | int] = {}
    for key, value in raw.items():
        try:
            numbers[key] = float(value)
        except ValueError as error:
            raise CohortError(
                f"[labels] csv {labels.csv}: {labels.keys_in} {key}: {value!r} is not a number"
            ) from error
    return numbers
