"""A cohort file: which PACS, which studies, which series is the image, where labels are.

One TOML file a hospital's IT writes once and reruns (`medfed data pull`):

    [pacs]
    protocol = "dicomweb"                      # or "dimse"
    url = "https://pacs.example.org/dicom-web" # dicomweb
    host = "pacs.example.org"                  # dimse: the PACS's address, port, AE title
    port = 104
    ae-title = "PACS"
    node-ae-title = "MEDFED"                   # this node's AE title (C-MOVE destination)
    node-port = 11113                          # where this node receives C-MOVE's C-STOREs
    retrieve = "get"                           # dimse: "get" (C-GET) or "move" (C-MOVE)

    [query]                                    # every key optional
    modality = "CR"
    body-part = "CHEST"
    study-date = "20200101-20241231"
    series-description = "*PA*"                # fnmatch pattern of the image series
    accession-numbers = ["A1", "A2"]           # or study-uids = [...]

    [labels]                                   # a CSV (classification, regression) ...
    task = "classification"                    # classification | regression
    csv = "labels.csv"                         # relative to the cohort file
    key = "AccessionNumber"                    # or "StudyInstanceUID": what the CSV's keys are
    key-column = "accession"                   # the CSV column holding them (default: key)
    column = "label"                           # the CSV column holding the label
    classes = ["normal", "pneumonia"]          # classification: names, index = class

    [labels]                                   # ... or DICOM SEG series in each study
    task = "segmentation3d"                    # segmentation | segmentation3d
    source = "seg"

Credentials never live in the file: MEDFED_PACS_USER / MEDFED_PACS_PASSWORD
(DICOMweb basic auth) and MEDFED_PACS_CA (a CA bundle for HTTPS or DIMSE TLS).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("dicomweb", "dimse")
RETRIEVALS = ("get", "move")
LABEL_KEYS = ("AccessionNumber", "StudyInstanceUID")
LABEL_TASKS = ("classification", "regression")
SEG_TASKS = ("segmentation", "segmentation3d")
AE_TITLE = re.compile(r"[ -~]{1,16}")
DATE_RANGE = re.compile(r"(\d{8})?-?(\d{8})?")


class CohortError(ValueError):
    """A cohort file that cannot be used, naming the file and the key."""


@dataclass(frozen=True)
class Pacs:
    """Where the PACS is and how this node talks to it."""

    protocol: str
    url: str = ""
    host: str = ""
    port: int = 104
    ae_title: str = "ANY-SCP"
    node_ae_title: str = "MEDFED"
    node_port: int = 11113
    retrieve: str = "get"


@dataclass(frozen=True)
class Query:
    """Which studies and which of their series make the cohort."""

    modality: str = ""
    body_part: str = ""
    study_date: str = ""
    series_description: str = "*"
    accession_numbers: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()

    def to_audit(self) -> dict[str, Any]:
        """The query as the audit log may hold it: no accession number or study UID, only
        how many were listed (identifiers stay out of logs)."""
        return {
            "modality": self.modality,
            "body-part": self.body_part,
            "study-date": self.study_date,
            "series-description": self.series_description,
            "accession-numbers": len(self.accession_numbers),
            "study-uids": len(self.study_uids),
        }


@dataclass(frozen=True)
class Labels:
    """Where each study's label comes from: a CSV keyed by accession or study UID."""

    task: str
    csv: Path | None = None  # source = "csv"
    source: str = "csv"  # csv | seg (a DICOM SEG series in the study)
    key: str = "AccessionNumber"
    key_column: str = ""  # the CSV's column of keys; empty: named as `key`
    column: str = "label"
    classes: tuple[str, ...] = ()

    @property
    def keys_in(self) -> str:
        return self.key_column or self.key


@dataclass(frozen=True)
class Cohort:
    """A whole cohort file."""

    path: Path
    pacs: Pacs
    query: Query = field(default_factory=Query)
    labels: Labels | None = None


def load_cohort(path: Path) -> Cohort:
    """The cohort in `path`; CohortError naming the file and the key on any problem."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CohortError(f"{path}: {error}") from error
    unknown = set(document) - {"pacs", "query", "labels"}
    if unknown:
        raise CohortError(f"{path}: unknown table [{sorted(unknown)[0]}] (pacs, query, labels)")
    pacs = _pacs(path, document.get("pacs", {}))
    query = _query(path, document.get("query", {}))
    labels = _labels(path, document["labels"]) if "labels" in document else None
    return Cohort(path, pacs, query, labels)


def _fields(path: Path, table: str, values: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """`values` with kebab-case keys as field names; CohortError on a key not `allowed`."""
    for key in values:
        if key not in allowed:
            raise CohortError(
                f"{path}: [{table}] unknown key '{key}' (known: {', '.join(sorted(allowed))})"
            )
    return {key.replace("-", "_"): value for key, value in values.items()}


def _pacs(path: Path, values: dict[str, Any]) -> Pacs:
    allowed = {"protocol", "url", "host", "port", "ae-title", "node-ae-title", "node-port",
               "retrieve"}  # fmt: skip
    pacs = Pacs(**_fields(path, "pacs", {"protocol": "", **values}, allowed))
    if pacs.protocol not in PROTOCOLS:
        raise CohortError(
            f"{path}: [pacs] protocol = {pacs.protocol!r}: expected dicomweb or dimse"
        )
    if pacs.protocol == "dicomweb" and not pacs.url.startswith(("http://", "https://")):
        raise CohortError(f"{path}: [pacs] url = {pacs.url!r}: expected the DICOMweb root URL")
    if pacs.protocol == "dimse":
        if not pacs.host:
            raise CohortError(f"{path}: [pacs] host: the PACS's address is needed for DIMSE")
        for key, title in (("ae-title", pacs.ae_title), ("node-ae-title", pacs.node_ae_title)):
            if not AE_TITLE.fullmatch(title):
                raise CohortError(f"{path}: [pacs] {key} = {title!r}: 1 to 16 ASCII characters")
        if pacs.retrieve not in RETRIEVALS:
            raise CohortError(f"{path}: [pacs] retrieve = {pacs.retrieve!r}: expected get or move")
    return pacs


def _query(path: Path, values: dict[str, Any]) -> Query:
    allowed = {"modality", "body-part", "study-date", "series-description",
               "accession-numbers", "study-uids"}  # fmt: skip
    fields_ = _fields(path, "query", values, allowed)
    for key in ("accession_numbers", "study_uids"):
        if key in fields_:
            fields_[key] = tuple(str(item) for item in fields_[key])
    query = Query(**fields_)
    if query.study_date and not DATE_RANGE.fullmatch(query.study_date):
        raise CohortError(
            f"{path}: [query] study-date = {query.study_date!r}: expected YYYYMMDD-YYYYMMDD"
        )
    return query


def _labels(path: Path, values: dict[str, Any]) -> Labels:
    allowed = {"task", "csv", "source", "key", "key-column", "column", "classes"}
    fields_ = _fields(path, "labels", values, allowed)
    fields_["classes"] = tuple(str(name) for name in fields_.get("classes", ()))
    if fields_.get("source", "csv") == "seg":
        labels = Labels(**{"task": "", **fields_})
        if labels.task not in SEG_TASKS:
            raise CohortError(f"{path}: [labels] task = {labels.task!r}: a SEG labels "
                              "segmentation or segmentation3d")  # fmt: skip
        return labels
    if fields_.get("source", "csv") != "csv":
        raise CohortError(f"{path}: [labels] source = {fields_['source']!r}: csv or seg")
    if "csv" not in fields_:
        raise CohortError(f"{path}: [labels] csv: the label file is needed")
    fields_["csv"] = (path.parent / str(fields_["csv"])).resolve()
    labels = Labels(**{"task": "", **fields_})
    if labels.task not in LABEL_TASKS:
        raise CohortError(f"{path}: [labels] task = {labels.task!r}: classification or regression")
    if labels.key not in LABEL_KEYS:
        raise CohortError(
            f"{path}: [labels] key = {labels.key!r}: AccessionNumber or StudyInstanceUID"
        )
    return labels
