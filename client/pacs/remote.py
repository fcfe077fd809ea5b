"""What every PACS protocol gives `medfed data pull`: studies, their series, and a series'
instances written into a folder. dicomweb.py and dimse.py each implement it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset


class PacsError(RuntimeError):
    """The PACS could not be reached or refused a request; the message says what to do."""


@dataclass(frozen=True)
class Study:
    """One study a query matched: what selecting and labelling it needs."""

    uid: str
    accession: str = ""
    date: str = ""
    modalities: str = ""


@dataclass(frozen=True)
class Series:
    """One series of a study, as the PACS describes it before anything is retrieved."""

    uid: str
    modality: str = ""
    description: str = ""
    body_part: str = ""
    number: int = 0
    instances: int = 0


class Remote(Protocol):
    """A PACS, whatever protocol reaches it."""

    def echo(self) -> str: ...

    def studies(self, filters: dict[str, str]) -> list[Study]: ...

    def series(self, study: str) -> list[Series]: ...

    def series_of_studies(self, studies: list[str]) -> dict[str, list[Series]]: ...

    def retrieve(self, study: str, series: str, into: Path) -> list[Dataset]: ...

    def store(self, paths: list[Path]) -> int: ...

    def close(self) -> None: ...


def study_of(ds: Dataset) -> Study:
    """A study-level query result as a Study."""
    modalities = ds.get("ModalitiesInStudy", "")
    if not isinstance(modalities, str):
        modalities = "\\".join(str(m) for m in modalities)
    return Study(
        uid=str(ds.get("StudyInstanceUID", "")),
        accession=str(ds.get("AccessionNumber", "") or ""),
        date=str(ds.get("StudyDate", "") or ""),
        modalities=modalities,
    )


def series_of(ds: Dataset) -> Series:
    """A series-level query result as a Series."""
    number = ds.get("SeriesNumber", 0)
    count = ds.get("NumberOfSeriesRelatedInstances", 0)
    return Series(
        uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        number=int(number) if str(number).strip() else 0,
        instances=int(count) if str(count).strip() else 0,
    )


def instance_name(ds: Dataset) -> str:
    """A retrieved instance's file name: a hash of its SOP Instance UID (no identifier in a
    file name; a retried transfer overwrites rather than duplicates)."""
    return hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:20] + ".dcm"


def save_instance(ds: Dataset, into: Path) -> Path:
    """Write one retrieved instance into `into` (C-STORE hands it decoded)."""
    path = into / instance_name(ds)
    ds.save_as(path, enforce_file_format=True)
    return path
