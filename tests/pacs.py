"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian's `orthanc` and
`orthanc-dicomweb`), started on 127.0.0.1 with a generated configuration and stopped by
pid, loaded with synthetic studies through its REST API."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfed.shared_models.supervision import free_port

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACS_AE, NODE_AE = "ORTHANC", "MEDFED"
CR, CT = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report series beside the image


def orthanc_binary() -> str:
    """Orthanc's executable; the Makefile installs it (Debian's `orthanc`)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None or not PLUGIN.is_file():
        raise RuntimeError("the PACS tests need Debian's orthanc and orthanc-dicomweb (make tools)")
    return found


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: where its REST/DICOMweb and DICOM ports are."""

    http: str
    dicom_port: int
    node_port: int  # where C-MOVE sends this test's node the instances

    @property
    def dicomweb(self) -> str:
        return f"{self.http}/dicom-web"

    def pacs_table(self, protocol: str, retrieve: str = "get") -> dict[str, object]:
        """A cohort file's [pacs] table reaching this Orthanc over `protocol`."""
        if protocol == "dicomweb":
            return {"protocol": protocol, "url": self.dicomweb}
        return {"protocol": protocol, "host": "127.0.0.1", "port": self.dicom_port,
                "ae-title": PACS_AE, "node-ae-title": NODE_AE, "node-port": self.node_port,
                "retrieve": retrieve}  # fmt: skip

    def upload(self, data: bytes) -> None:
        httpx.post(f"{self.http}/instances", content=data, timeout=30).raise_for_status()


@contextmanager
def orthanc(folder: Path, register_node: bool = True) -> Iterator[Orthanc]:
    """Orthanc on free 127.0.0.1 ports with its storage in `folder`; the test node is a
    known C-MOVE destination unless `register_node` is False."""
    http, dicom, node = free_port(), free_port(), free_port()
    config = {
        "Name": "medfed-test", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "HttpPort": http, "DicomPort": dicom,
        "DicomAet": PACS_AE, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpBindAddress": "127.0.0.1", "DicomCheckCalledAet": True,
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"medfed": [NODE_AE, "127.0.0.1", node]} if register_node else {},
        "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True, "StableAge": 1,
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(
        [orthanc_binary(), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Orthanc did not answer within 30 s"
            time.sleep(0.1)
        yield Orthanc(url, dicom, node)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def instance(
    study: str, series: str, *, sop_class: str = CR, modality: str = "CR",
    accession: str = "", description: str = "PA", body_part: str = "CHEST",
    pixels: np.ndarray | None = None, position: float | None = None, number: int = 1,
    series_number: int = 1,
) -> bytes:  # fmt: skip
    """One DICOM instance as bytes (Part 10): an image unless `pixels` is None."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = f"P-{study[-6:]}", "Test^Patient"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = accession, "20240115", "101010"
    ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = modality, description, body_part
    ds.SeriesNumber, ds.InstanceNumber = series_number, number
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if position is not None:
            ds.ImagePositionPatient = [0.0, 0.0, position]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chest_study(accession: str, label: int, seed: int) -> list[bytes]:
    """A chest X-ray study: one CR image whose brightness follows its class, and a report
    series beside it (not an image)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((32, 32)) * 800 + 1200 * label).astype(np.uint16)
    study = generate_uid()
    return [
        instance(study, generate_uid(), accession=accession, pixels=pixels),
        instance(study, generate_uid(), sop_class=SR, modality="SR", accession=accession,
                 description="report", series_number=2),
    ]  # fmt: skip


def ct_study(accession: str, rows: tuple[int, ...], positions: bool = True) -> list[bytes]:
    """A CT series of one slice per entry of `rows` (its number of rows): differing rows mix
    geometries; `positions=False` leaves out ImagePositionPatient."""
    study, series = generate_uid(), generate_uid()
    return [
        instance(study, series, sop_class=CT, modality="CT", accession=accession,
                 description="PA", pixels=np.zeros((r, 16)), number=k + 1,
                 position=float(k) if positions else None)
        for k, r in enumerate(rows)
    ]  # fmt: skip


def ct_with_seg(accession: str, seg_of_other: bool = False, with_seg: bool = True) -> list[bytes]:
    """A CT volume (4 slices of 16x16) bright where its lesion is (slices 1-2 only), and a
    DICOM SEG of the lesion (highdicom). `seg_of_other`: the SEG is drawn on another
    series' instances, so it does not fit this image."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    study = generate_uid()
    shift = sum(map(ord, accession)) % 5  # each study's own lesion (a site refuses duplicates)
    lesion = np.zeros((4, 16, 16), bool)
    lesion[1:3, 4 + shift : 9 + shift, 6:12] = True
    volume = np.where(lesion, 1500, 100)
    images = [instance(study, (series := generate_uid()) if k == 0 else series, sop_class=CT,
                       modality="CT", accession=accession, description="AX", pixels=volume[k],
                       number=k + 1, position=float(k) * 2.0)
              for k in range(4)]  # fmt: skip
    sources = [pydicom.dcmread(io.BytesIO(data)) for data in images]
    for ds in sources:
        ds.FrameOfReferenceUID = sources[0].get("FrameOfReferenceUID", generate_uid())
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.StudyID, ds.SliceThickness = "1", 2.0
    if seg_of_other:
        sources = [pydicom.dcmread(io.BytesIO(d)) for d in ct_with_seg(accession, with_seg=False)]
        for ds in sources:
            ds.StudyInstanceUID = study
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=lesion, segmentation_type="BINARY",
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=50,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
    )  # fmt: skip
    buffer = io.BytesIO()
    seg.save_as(buffer)
    rewritten = []
    for ds in sources if not seg_of_other else [pydicom.dcmread(io.BytesIO(d)) for d in images]:
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        rewritten.append(out.getvalue())
    return rewritten + ([buffer.getvalue()] if with_seg else [])
