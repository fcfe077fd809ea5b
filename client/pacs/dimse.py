"""A PACS over DIMSE (C-ECHO, C-FIND, C-GET or C-MOVE), with `pynetdicom`.

C-GET brings the instances back on the association this node opened; C-MOVE
has the PACS open one to this node's storage SCP, which must be registered at
the PACS under `node-ae-title` (a refusal, 0xA801, says so). The storage SCP
runs for the pull, keeps an instance only while a retrieval is under way, only
from the PACS's address and AE title, and only of the study and series asked for.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    Verification,
)

from medfed.client.pacs.cohort import Pacs
from medfed.client.pacs.remote import PacsError, Series, Study, save_instance, series_of, study_of

CA_ENV = "MEDFED_PACS_CA"
# What a cohort's images and labels are stored as; C-GET negotiates each as a storage role.
STORAGE = [CTImageStorage, MRImageStorage, ComputedRadiographyImageStorage,
           DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing,
           EnhancedCTImageStorage, EnhancedMRImageStorage, SecondaryCaptureImageStorage,
           UltrasoundImageStorage, SegmentationStorage]  # fmt: skip
UNKNOWN_DESTINATION = 0xA801
UID_BATCH = 64  # studies per series-level C-FIND
STUDY_KEYS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "ModalitiesInStudy")
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription",
               "BodyPartExamined", "SeriesNumber", "NumberOfSeriesRelatedInstances")  # fmt: skip


def _identifier(level: str, keys: tuple[str, ...], filters: dict[str, str]) -> Dataset:
    """A C-FIND identifier: the keys to return (empty) and those to match."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in filters.items():
        setattr(ds, key, value)
    return ds


class DimsePacs:
    """Studies, series and instances over DIMSE: queries and retrievals share one
    association, and C-MOVE one storage SCP, for a whole pull (`close` ends them); a new
    association per request cost more than the transfer itself."""

    def __init__(self, pacs: Pacs, timeout: float = 60) -> None:
        self.pacs, self.timeout = pacs, timeout
        self.where = f"{pacs.ae_title}@{pacs.host}:{pacs.port}"
        self._assoc: Association | None = None
        self._server: Any = None
        self._receiver = _Receiver(pacs.host)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.pacs.node_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        tls = None
        if os.environ.get(CA_ENV):
            tls = (ssl.create_default_context(cafile=os.environ[CA_ENV]), self.pacs.host)
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title,
                             tls_args=tls, **kwargs)  # fmt: skip
        if not assoc.is_established:
            why = "refused the association" if assoc.is_rejected else "did not answer"
            raise PacsError(
                f"PACS {self.where} {why} (check its address, port and AE title, and that it "
                f"lists this node's AE title {self.pacs.node_ae_title!r} as a client)"
            )
        return assoc

    @contextmanager
    def _association(self, ae: AE) -> Iterator[Association]:
        assoc = self._associate(ae)
        try:
            yield assoc
        finally:
            assoc.release()

    def _query_retrieve(self) -> Association:
        """The pull's association for C-FIND, C-GET (receiving its C-STOREs) and C-MOVE."""
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = self._ae()
        for model in (StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove, *STORAGE):  # fmt: skip
            ae.add_requested_context(model)
        roles = [build_role(storage, scp_role=True) for storage in STORAGE]
        handlers = [(evt.EVT_C_STORE, self._receiver.store)]
        self._assoc = self._associate(ae, ext_neg=roles, evt_handlers=handlers)
        return self._assoc

    def close(self) -> None:
        """End the pull's association and storage SCP."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        if self._server is not None:
            self._server.shutdown()
        self._assoc = self._server = None

    def echo(self) -> str:
        ae = self._ae()
        ae.add_requested_context(Verification)
        with self._association(ae) as assoc:
            status = assoc.send_c_echo()
        if not status or status.Status != 0:
            raise PacsError(f"PACS {self.where} answered C-ECHO with {_status(status)}")
        return f"DIMSE C-ECHO to {self.where} succeeded"

    def _find(self, identifier: Dataset) -> list[Dataset]:
        found: list[Dataset] = []
        model = StudyRootQueryRetrieveInformationModelFind
        for status, match in self._query_retrieve().send_c_find(identifier, model):
            if not status or status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise PacsError(f"PACS {self.where} refused C-FIND: {_status(status)}")
            if match is not None and status.Status in (0xFF00, 0xFF01):
                found.append(match)
        return found

    def studies(self, filters: dict[str, str]) -> list[Study]:
        return [study_of(ds) for ds in self._find(_identifier("STUDY", STUDY_KEYS, filters))]

    def series(self, study: str) -> list[Series]:
        identifier = _identifier("SERIES", SERIES_KEYS, {"StudyInstanceUID": study})
        return [series_of(ds) for ds in self._find(identifier)]

    def series_of_studies(self, studies: list[str]) -> dict[str, list[Series]]:
        """The series of many studies, a C-FIND per UID_BATCH of them (DICOM's UID list
        matching): one round trip per study cost as much as retrieving it. A study missing
        from the answer (a PACS without list matching) is asked for on its own."""
        found: dict[str, list[Series]] = {}
        for start in range(0, len(studies), UID_BATCH):
            batch = studies[start : start + UID_BATCH]
            uids = {"StudyInstanceUID": "\\".join(batch)}  # a list of UIDs, "\\"-separated
            identifier = _identifier("SERIES", SERIES_KEYS, uids)
            try:
                for ds in self._find(identifier):
                    found.setdefault(str(ds.get("StudyInstanceUID", "")), []).append(series_of(ds))
            except PacsError:
                pass  # refused as a list: each study on its own below
        return {uid: found.get(uid) or self.series(uid) for uid in studies}

    def retrieve(self, study: str, series: str, into: Path) -> list[Dataset]:
        identifier = _identifier("SERIES", (), {"StudyInstanceUID": study,
                                                "SeriesInstanceUID": series})  # fmt: skip
        self._receiver.keeper = kept = _Keeper(study, series, into)
        try:
            if self.pacs.retrieve == "move":
                self._start_storage_scp()
                answers = self._query_retrieve().send_c_move(
                    identifier, self.pacs.node_ae_title, StudyRootQueryRetrieveInformationModelMove
                )
            else:
                answers = self._query_retrieve().send_c_get(
                    identifier, StudyRootQueryRetrieveInformationModelGet
                )
            what = "C-MOVE" if self.pacs.retrieve == "move" else "C-GET"
            for status, _ in answers:
                _check_retrieval(status, what, self.where, self.pacs.node_ae_title)
        finally:
            self._receiver.keeper = None  # nothing is kept between retrievals
        return kept.headers

    def _start_storage_scp(self) -> None:
        """This node's storage SCP for C-MOVE, once per pull: the PACS's AE title only."""
        if self._server is not None:
            return
        scp = self._ae()
        scp.require_calling_aet = [self.pacs.ae_title]
        for storage in STORAGE:
            scp.add_supported_context(storage)
        handlers = [(evt.EVT_C_STORE, self._receiver.store)]
        self._server = scp.start_server(
            ("", self.pacs.node_port), block=False, evt_handlers=handlers
        )

    def store(self, paths: list[Path]) -> int:
        """C-STORE of the files in `paths` into the PACS; how many it stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        ae = self._ae()
        for sop_class, syntax in sorted({_context(ds) for ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
        with self._association(ae) as assoc:
            for path, ds in zip(paths, datasets, strict=True):
                status = assoc.send_c_store(ds)
                if not status or int(status.Status) not in (0x0000, 0xB000, 0xB006):
                    raise PacsError(f"PACS {self.where} refused C-STORE of {path.name}: "
                                    f"{_status(status)}")  # fmt: skip
        return len(datasets)


class _Receiver:
    """Where a C-STORE goes: the retrieval under way's keeper, else nowhere (refused). The
    C-MOVE storage SCP takes associations only from the PACS's AE title, which proves
    nothing, so it also keeps only what arrives from the PACS's own address."""

    def __init__(self, pacs_host: str = "") -> None:
        self.keeper: _Keeper | None = None
        self.addresses = _addresses(pacs_host) if pacs_host else set()

    def store(self, event: evt.Event) -> int:
        keeper = self.keeper
        if keeper is None:
            return 0xA700
        if event.assoc.is_acceptor and str(event.assoc.requestor.address) not in self.addresses:
            return 0xA700  # a C-MOVE's instances come from the PACS, not from anyone
        return keeper.store(event)


def _addresses(host: str) -> set[str]:
    """The IP addresses `host` resolves to (the PACS's, for its C-MOVE associations)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


class _Keeper:
    """Writes the instances of one series that arrive by C-STORE; refuses any other."""

    def __init__(self, study: str, series: str, into: Path, expected: int = 0) -> None:
        self.study, self.series, self.into = study, series, into
        self.headers: list[Dataset] = []  # of what was kept, pixels left out
        self.limit = expected or 100_000  # never more than the PACS said the series holds
        self.lock = threading.Lock()

    def store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        asked = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        if asked != (self.study, self.series) or len(self.headers) >= self.limit:
            return 0xA700  # "out of resources" is the closest refusal DIMSE has for "not asked"
        with self.lock:
            save_instance(ds, self.into)
            if "PixelData" in ds:
                del ds.PixelData  # the header is what the checks read
            self.headers.append(ds)
        return 0x0000


def _context(ds: Dataset) -> tuple[str, str]:
    """The presentation context a file is sent in: its SOP class, its own transfer syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    return str(ds.SOPClassUID), str(syntax)


def _status(status: Dataset | None) -> str:
    return "no answer" if not status else f"status 0x{int(status.Status):04X}"


def _check_retrieval(status: Dataset | None, what: str, where: str, node_ae: str) -> None:
    """PacsError for a failed C-GET/C-MOVE status; a refused C-MOVE says how to register
    the node (the standard refusal is 0xA801, "move destination unknown"; Orthanc answers
    0xC000 for the same)."""
    if not status:
        raise PacsError(f"PACS {where} gave no answer to {what}")
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01):
        return
    meaning = "move destination unknown" if code == UNKNOWN_DESTINATION else "refused"
    hint = ""
    if what == "C-MOVE":
        hint = (
            f": if the PACS does not know this node, register it there as a DICOM modality "
            f"with AE title {node_ae!r}, this host's address and the cohort's node-port, "
            'or use retrieve = "get"'
        )
    raise PacsError(f"PACS {where} {meaning} {what} ({_status(status)}){hint}")
