"""A PACS over DIMSE (C-ECHO, C-FIND, C-GET or C-MOVE), with `pynetdicom`.

C-GET brings the instances back on the association this node opened; C-MOVE
has the PACS open one to this node's storage SCP, which must be registered at
the PACS under `node-ae-title` (a refusal 0xA801 says so). The storage SCP is
up only while a move runs, accepts associations from the PACS's AE title only,
and keeps only the instances of the series being moved.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
STUDY_KEYS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "ModalitiesInStudy")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
               "SeriesNumber", "NumberOfSeriesRelatedInstances")  # fmt: skip


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
    """Studies, series and instances over DIMSE."""

    def __init__(self, pacs: Pacs, timeout: float = 60) -> None:
        self.pacs, self.timeout = pacs, timeout
        self.where = f"{pacs.ae_title}@{pacs.host}:{pacs.port}"

    def _ae(self) -> AE:
        ae = AE(ae_title=self.pacs.node_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    @contextmanager
    def _association(self, ae: AE, **kwargs) -> Iterator[Association]:
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
        try:
            yield assoc
        finally:
            assoc.release()

    def echo(self) -> str:
        ae = self._ae()
        ae.add_requested_context(Verification)
        with self._association(ae) as assoc:
            status = assoc.send_c_echo()
        if not status or status.Status != 0:
            raise PacsError(f"PACS {self.where} answered C-ECHO with {_status(status)}")
        return f"DIMSE C-ECHO to {self.where} succeeded"

    def _find(self, identifier: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        found: list[Dataset] = []
        with self._association(ae) as assoc:
            for status, match in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
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

    def retrieve(self, study: str, series: str, into: Path) -> int:
        identifier = _identifier("SERIES", (), {"StudyInstanceUID": study,
                                                "SeriesInstanceUID": series})  # fmt: skip
        kept = _Keeper(series, into)
        if self.pacs.retrieve == "move":
            self._move(identifier, kept)
        else:
            self._get(identifier, kept)
        return kept.count

    def _get(self, identifier: Dataset, kept: _Keeper) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for storage in STORAGE:
            ae.add_requested_context(storage)
        roles = [build_role(storage, scp_role=True) for storage in STORAGE]
        handlers = [(evt.EVT_C_STORE, kept.store)]
        with self._association(ae, ext_neg=roles, evt_handlers=handlers) as assoc:
            for status, _ in assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet
            ):
                _check_retrieval(status, "C-GET", self.where, self.pacs.node_ae_title)

    def _move(self, identifier: Dataset, kept: _Keeper) -> None:
        scp = self._ae()
        scp.require_calling_aet = [self.pacs.ae_title]
        for storage in STORAGE:
            scp.add_supported_context(storage)
        server = scp.start_server(("", self.pacs.node_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, kept.store)])  # fmt: skip
        try:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae) as assoc:
                for status, _ in assoc.send_c_move(
                    identifier, self.pacs.node_ae_title, StudyRootQueryRetrieveInformationModelMove
                ):
                    _check_retrieval(status, "C-MOVE", self.where, self.pacs.node_ae_title)
        finally:
            server.shutdown()

    def store(self, paths: list[Path]) -> int:
        """C-STORE of the files in `paths` into the PACS; how many it stored."""
        datasets = [pydicom.dcmread(path) for path in paths]
        ae = self._ae()
        for sop_class, syntax in sorted({_context(ds) for ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
        with self._association(ae) as assoc:
            for path, ds in zip(paths, datasets, strict=True):
                status = assoc.send_c_store(ds)
                if not status or int(status.Status) not in (0x0000, 0xB000, 0xB006, 0xB007):
                    raise PacsError(f"PACS {self.where} refused C-STORE of {path.name}: "
                                    f"{_status(status)}")  # fmt: skip
        return len(datasets)


class _Keeper:
    """Writes the instances of one series that arrive by C-STORE; refuses any other."""

    def __init__(self, series: str, into: Path) -> None:
        self.series, self.into, self.count = series, into, 0
        self.lock = threading.Lock()

    def store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if str(ds.get("SeriesInstanceUID", "")) != self.series:
            return 0xA700  # "out of resources" is the closest refusal DIMSE has for "not asked"
        with self.lock:
            save_instance(ds, self.into)
            self.count += 1
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
    if code in (0x0000, 0xFF00, 0xFF01, 0xB000):
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
