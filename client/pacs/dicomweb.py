"""A PACS over DICOMweb (QIDO-RS to query, WADO-RS to retrieve), with `dicomweb-client`."""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from medfed.client.pacs.remote import (
    PacsError,
    Series,
    Study,
    instance_name,
    series_of,
    study_of,
)

USER_ENV, PASSWORD_ENV, CA_ENV = "MEDFED_PACS_USER", "MEDFED_PACS_PASSWORD", "MEDFED_PACS_CA"
STUDY_FIELDS = ["StudyInstanceUID", "AccessionNumber", "StudyDate", "ModalitiesInStudy"]
PAGE = 500  # QIDO-RS results asked for at a time
MAX_PAGES = 200  # 100,000 results: a PACS that pages forever is stopped here
UID_BATCH = 64  # studies per series search
SERIES_FIELDS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
                 "SeriesNumber", "NumberOfSeriesRelatedInstances"]  # fmt: skip


def _session(url: str) -> requests.Session:
    """Basic auth and a CA bundle from the environment, where the PACS needs them; a
    password is never sent in the clear, and the CA named is the one used (requests
    would otherwise take REQUESTS_CA_BUNDLE's over it)."""
    session = requests.Session()
    if os.environ.get(USER_ENV):
        if not url.startswith("https://"):
            raise PacsError(f"{USER_ENV} is set but the PACS's URL is not https: the "
                            "password would cross the network in the clear")  # fmt: skip
        session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    if os.environ.get(CA_ENV):
        session.verify = os.environ[CA_ENV]
        session.trust_env = False
    return session


def _shown(url: str) -> str:
    """`url` as messages show it: without a user or password written into it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname or "")) if parts.username else url


class DicomWebPacs:
    """Studies, series and instances over DICOMweb."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.url = _shown(url.rstrip("/"))  # what messages name
        self.base, self.timeout = url.rstrip("/"), timeout
        self.session = _session(url)
        self.client = DICOMwebClient(url.rstrip("/"), session=self.session, timeout=timeout)

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

    def close(self) -> None:
        """End the HTTP session's kept-alive connections."""
        self.session.close()

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
        for _ in range(MAX_PAGES):
            page = self._call(what, search, limit=PAGE, offset=len(found), **kwargs)
            fresh = {uid: ds for ds in map(Dataset.from_json, page)
                     if (uid := _uid(ds)) not in found}  # fmt: skip
            found.update(fresh)
            if len(page) < PAGE or not fresh:
                return list(found.values())
        raise PacsError(f"PACS at {self.url} answered {what} with more than "
                        f"{MAX_PAGES * PAGE} results: narrow the cohort's [query]")  # fmt: skip

    def studies(self, filters: dict[str, str]) -> list[Study]:
        search = self.client.search_for_studies
        found = self._search("a study query", search, fields=STUDY_FIELDS, search_filters=filters)
        return [study_of(ds) for ds in found]

    def series(self, study: str) -> list[Series]:
        found = self._search("a series query", self.client.search_for_series,
                             study_instance_uid=study, fields=SERIES_FIELDS)  # fmt: skip
        return [series_of(ds) for ds in found]

    def series_of_studies(self, studies: list[str]) -> dict[str, list[Series]]:
        """The series of many studies, a QIDO-RS search per UID_BATCH of them (UID list
        matching, comma-separated): a search per study cost a third of retrieving it. A
        study missing from the answer (a PACS without list matching) is asked on its own."""
        found: dict[str, list[Series]] = {}
        for start in range(0, len(studies), UID_BATCH):
            batch = {"StudyInstanceUID": ",".join(studies[start : start + UID_BATCH])}
            try:
                answer = self._search("a series query", self.client.search_for_series,
                                      fields=[*SERIES_FIELDS, "StudyInstanceUID"],
                                      search_filters=batch)  # fmt: skip
            except PacsError:
                continue  # refused as a list: each study on its own below
            for ds in answer:
                found.setdefault(str(ds.get("StudyInstanceUID", "")), []).append(series_of(ds))
        return {uid: found.get(uid) or self.series(uid) for uid in studies}

    def retrieve(self, study: str, series: str, into: Path) -> list[Dataset]:
        """Every instance of the series into `into`, streamed (one in memory); their
        headers, for the checks."""
        return self._call("a series retrieval", self._save_series, study, series, into)

    def _save_series(self, study: str, series: str, into: Path) -> list[Dataset]:
        """Each part of the WADO-RS answer written as it came, streamed, named from its
        header: decoding every instance into pydicom and encoding it again (what
        `iter_series` and a save do) took most of a pull's time. The multipart decoding
        is dicomweb-client's own (a private method: the public ones return datasets)."""
        response = self.session.get(
            f"{self.base}/studies/{study}/series/{series}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            stream=True, timeout=self.timeout,
        )  # fmt: skip
        response.raise_for_status()
        headers = []
        for part in self.client._decode_multipart_message(response, stream=True):
            header = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
            (into / instance_name(header)).write_bytes(part)
            headers.append(header)
        return headers

    def store(self, paths: list[Path]) -> int:
        """STOW-RS of the files in `paths` into the PACS; how many it stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        answer = self._call(
            "storing results (STOW-RS)", self.client.store_instances, datasets=datasets
        )
        failed = len(answer.get("FailedSOPSequence", [])) if answer is not None else 0
        if failed:  # a 202: some stored, some not; none may pass for stored
            raise PacsError(f"PACS at {self.url} refused {failed} of {len(datasets)} results")
        return len(datasets)


def _uid(ds: Dataset) -> str:
    """What tells one result from another: its series UID, else its study UID."""
    return str(ds.get("SeriesInstanceUID") or ds.get("StudyInstanceUID", ""))
