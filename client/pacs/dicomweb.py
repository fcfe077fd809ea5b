"""A PACS over DICOMweb (QIDO-RS to query, WADO-RS to retrieve), with `dicomweb-client`."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from medfed.client.pacs.remote import PacsError, Series, Study, save_instance, series_of, study_of

USER_ENV, PASSWORD_ENV, CA_ENV = "MEDFED_PACS_USER", "MEDFED_PACS_PASSWORD", "MEDFED_PACS_CA"
STUDY_FIELDS = ["StudyInstanceUID", "AccessionNumber", "StudyDate", "ModalitiesInStudy"]
PAGE = 500  # QIDO-RS results asked for at a time
SERIES_FIELDS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
                 "SeriesNumber", "NumberOfSeriesRelatedInstances"]  # fmt: skip


def _session() -> requests.Session:
    """Basic auth and a CA bundle from the environment, where the PACS needs them."""
    session = requests.Session()
    if os.environ.get(USER_ENV):
        session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    if os.environ.get(CA_ENV):
        session.verify = os.environ[CA_ENV]
    return session


class DicomWebPacs:
    """Studies, series and instances over DICOMweb."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, session=_session(), timeout=timeout)

    def _call(self, what: str, call, *args, **kwargs):
        """`call`, with the PACS's failures said in a line naming the URL."""
        try:
            return call(*args, **kwargs)
        except requests.exceptions.ConnectionError as error:
            raise PacsError(
                f"PACS unreachable at {self.url} ({what}): {error.__class__.__name__}"
            ) from error
        except requests.exceptions.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            hint = (
                " (check MEDFED_PACS_USER / MEDFED_PACS_PASSWORD)" if status in (401, 403) else ""
            )
            raise PacsError(f"PACS at {self.url} refused {what}: HTTP {status}{hint}") from error

    def echo(self) -> str:
        """A cheap QIDO-RS request: the PACS answers and lets this node query."""
        self._call("a study query", self.client.search_for_studies, limit=1)
        return f"DICOMweb at {self.url} answers"

    def _search(self, what: str, search, **kwargs) -> list[Dataset]:
        """Every result of a QIDO-RS search, a page at a time. dicomweb-client's own paging
        asks until a page comes back empty, which never happens where a PACS ignores
        `offset` (Orthanc 1.10 for some searches answered 30,000 requests): a page that
        repeats what was found, or a short one, is the last."""
        found: dict[str, Dataset] = {}
        while True:
            page = self._call(what, search, limit=PAGE, offset=len(found), **kwargs)
            fresh = {uid: ds for ds in map(Dataset.from_json, page)
                     if (uid := _uid(ds)) not in found}  # fmt: skip
            found.update(fresh)
            if len(page) < PAGE or not fresh:
                return list(found.values())

    def studies(self, filters: dict[str, str]) -> list[Study]:
        search = self.client.search_for_studies
        found = self._search("a study query", search, fields=STUDY_FIELDS, search_filters=filters)
        return [study_of(ds) for ds in found]

    def series(self, study: str) -> list[Series]:
        found = self._search("a series query", self.client.search_for_series,
                             study_instance_uid=study, fields=SERIES_FIELDS)  # fmt: skip
        return [series_of(ds) for ds in found]

    def retrieve(self, study: str, series: str, into: Path) -> int:
        """Every instance of the series into `into`, streamed: one instance in memory."""
        return self._call("a series retrieval", self._save_series, study, series, into)

    def _save_series(self, study: str, series: str, into: Path) -> int:
        count = 0
        for instance in self.client.iter_series(study, series):
            save_instance(instance, into)
            count += 1
        return count

    def store(self, paths: list[Path]) -> int:
        """STOW-RS of the files in `paths` into the PACS; how many it stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        self._call("storing results (STOW-RS)", self.client.store_instances, datasets=datasets)
        return len(datasets)


def _uid(ds: Dataset) -> str:
    """What tells one result from another: its series UID, else its study UID."""
    return str(ds.get("SeriesInstanceUID") or ds.get("StudyInstanceUID", ""))
