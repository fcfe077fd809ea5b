"""`medfed data pull` against a real Orthanc (tests/pacs.py): a cohort over DICOMweb and
over DIMSE (C-GET and C-MOVE) into a site folder the data layer reads unchanged;
incremental, safe when cut off, and clear about what it left out."""

from __future__ import annotations

import json

import pydicom
import pytest
import tomli_w

from medfed.client.data.site import load_site
from medfed.client.pacs.cohort import load_cohort
from medfed.client.pacs.pull import connect, pull
from medfed.client.pacs.remote import PacsError
from medfed.server.cli import main
from tests.conftest import tiny_config
from tests.pacs import chest_study, ct_study, orthanc

pytestmark = pytest.mark.e2e
LABELLED = 11  # ACC000..ACC010 have a label row; ACC011 has none


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for i in range(12):
            for data in chest_study(f"ACC{i:03d}", i % 2, seed=i):
                server.upload(data)
        for data in ct_study("ACC100", rows=(16, 16, 8)):  # one slice of another grid
            server.upload(data)
        for data in ct_study("ACC101", rows=(16, 16), positions=False):
            server.upload(data)
        for data in chest_study("ACC102", 0, seed=99)[1:]:  # the report alone
            server.upload(data)
        yield server


def _cohort(tmp_path, pacs, protocol: str, retrieve: str = "get", **pacs_keys):
    rows = [f"ACC{i:03d},{'pneumonia' if i % 2 else 'normal'}" for i in range(LABELLED)]
    rows += ["ACC100,normal", "ACC101,normal", "ACC102,normal", "ACC999,normal"]
    (tmp_path / "labels.csv").write_text("accession,finding\n" + "\n".join(rows) + "\n")
    cohort = {
        "pacs": {**pacs.pacs_table(protocol, retrieve), **pacs_keys},
        "query": {"study-date": "20240101-20241231", "series-description": "PA"},
        "labels": {"task": "classification", "csv": "labels.csv", "key": "AccessionNumber",
                   "key-column": "accession", "column": "finding",
                   "classes": ["normal", "pneumonia"]},
    }  # fmt: skip
    path = tmp_path / "cohort.toml"
    path.write_text(tomli_w.dumps(cohort))
    return path


@pytest.mark.parametrize(("protocol", "retrieve"), [("dicomweb", ""), ("dimse", "get"),
                                                    ("dimse", "move")])  # fmt: skip
def test_a_cohort_is_pulled_into_a_site_the_data_layer_reads(tmp_path, pacs, protocol, retrieve):
    cohort = load_cohort(_cohort(tmp_path, pacs, protocol, retrieve or "get"))
    site = tmp_path / "site"
    report = pull(cohort, site)
    assert report.found == 15 and report.retrieved == LABELLED
    assert report.skipped == {
        "accession ACC100": "mixes geometries: Rows takes 2 values (16, 8)",
        "accession ACC101": "lacks geometry: ImagePositionPatient is missing, needed to stack "
        "2 slices",
        "accession ACC102": "no image series matches the query (1 series: SR)",
    }
    assert report.unlabelled == ["accession ACC011"]
    assert report.labels_unmatched == ["ACC999"]
    dataset = json.loads((site / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "normal", "1": "pneumonia"}
    assert sorted(e["label"] for e in dataset["training"]) == [0] * 6 + [1] * 5
    assert not any("ACC" in e["image"] for e in dataset["training"]), "no identifier in a path"
    assert (site / ".pull").stat().st_mode & 0o077 == 0, "the study index is the site's alone"
    cfg = tiny_config(task="classification", image_size=32, class_names="normal,pneumonia")
    loaded = load_site(site, cfg)
    assert len(loaded.train) + len(loaded.val) == LABELLED and not loaded.problems
    assert loaded.modality == "CR"


def test_a_rerun_retrieves_only_what_is_new(tmp_path, pacs):
    cohort = load_cohort(_cohort(tmp_path, pacs, "dicomweb"))
    pull(cohort, tmp_path / "site")
    again = pull(cohort, tmp_path / "site")
    assert again.retrieved == 0 and again.already == LABELLED + 3
    with (tmp_path / "labels.csv").open("a") as labels:  # ACC011 gets its label row
        labels.write("ACC011,pneumonia\n")
    newly = pull(cohort, tmp_path / "site")
    assert newly.retrieved == 1 and newly.already == LABELLED + 3 and not newly.unlabelled
    training = json.loads((tmp_path / "site" / "dataset.json").read_text())["training"]
    assert len(training) == LABELLED + 1


class _CutOff:
    """A PACS whose transfer breaks after one instance of the `nth` series retrieved."""

    def __init__(self, remote, nth: int) -> None:
        self.remote, self.nth, self.calls = remote, nth, 0

    def __getattr__(self, name):
        return getattr(self.remote, name)

    def retrieve(self, study, series, into):
        self.calls += 1
        headers = self.remote.retrieve(study, series, into)
        if self.calls == self.nth:
            raise PacsError("connection reset during the transfer")
        return headers


def test_a_transfer_cut_off_half_way_resumes_and_nothing_half_written_is_read(tmp_path, pacs):
    cohort = load_cohort(_cohort(tmp_path, pacs, "dicomweb"))
    site = tmp_path / "site"
    with pytest.raises(PacsError, match="connection reset"):
        pull(cohort, site, remote=_CutOff(connect(cohort.pacs), nth=4))
    index = json.loads((site / ".pull" / "index.json").read_text())
    held, skipped = len(index["studies"]), len(index["skipped"])
    assert held + skipped >= 3, "the studies before the cut one are recorded"
    assert len(list((site / "imagesTr").iterdir())) == held, "the cut one is not in place"
    resumed = pull(cohort, site)
    assert resumed.retrieved == LABELLED - held and resumed.already == held + skipped
    dataset = json.loads((site / "dataset.json").read_text())
    assert len(dataset["training"]) == LABELLED
    assert not list((site / ".pull" / "partial").iterdir()), "no partial series is left"


def test_the_audit_line_holds_counts_and_the_query_never_an_identifier(tmp_path, pacs, monkeypatch):
    monkeypatch.setenv("MEDFED_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    cohort = load_cohort(_cohort(tmp_path, pacs, "dicomweb"))
    pull(cohort, tmp_path / "site", min_count=5)
    line = (tmp_path / "audit.jsonl").read_text()
    entry = json.loads(line)
    assert entry["event"] == "data-pulled" and entry["retrieved"] == LABELLED
    assert entry["skipped"] == "below 5" and entry["unlabelled"] == "below 5"
    assert "ACC" not in line and "Test^Patient" not in line and "P-" not in line


def test_echo_and_the_refusals_say_what_to_do(tmp_path, pacs, capsys):
    ok = _cohort(tmp_path, pacs, "dimse")
    assert main(["data", "pull", str(ok), "--echo"]) == 0
    assert "C-ECHO" in capsys.readouterr().out
    wrong_ae = _cohort(tmp_path, pacs, "dimse", **{"ae-title": "NOTORTHANC"})
    assert main(["data", "pull", str(wrong_ae), "--out", str(tmp_path / "s")]) == 2
    assert "refused the association" in capsys.readouterr().err
    gone = _cohort(tmp_path, pacs, "dicomweb", url="http://127.0.0.1:9/dicom-web")
    assert main(["data", "pull", str(gone), "--echo"]) == 2
    assert "PACS unreachable at http://127.0.0.1:9/dicom-web" in capsys.readouterr().err


def test_a_move_to_a_node_the_pacs_does_not_know_explains_the_registration(tmp_path):
    with orthanc(tmp_path / "orthanc", register_node=False) as server:
        for data in chest_study("ACC000", 0, seed=0):
            server.upload(data)
        cohort = load_cohort(_cohort(tmp_path, server, "dimse", "move"))
        with pytest.raises(
            PacsError,
            match=r"C-MOVE \(status 0x.{4}\): if the PACS does not know "
            r"this node, register it there .* AE title 'MEDFED'",
        ):
            pull(cohort, tmp_path / "site")


def test_a_segmentation_cohort_pairs_each_volume_with_its_seg_on_one_grid(tmp_path):
    import nibabel as nib
    import numpy as np

    from tests.pacs import ct_with_seg

    with orthanc(tmp_path / "orthanc") as server:
        for name in ("SEG1", "SEG2", "SEG3"):
            for data in ct_with_seg(name):
                server.upload(data)
        for data in ct_with_seg("OTHER", seg_of_other=True):
            server.upload(data)
        for data in ct_with_seg("NOSEG", with_seg=False):
            server.upload(data)
        cohort = {"pacs": {"protocol": "dicomweb", "url": server.dicomweb},
                  "query": {"modality": "CT"},
                  "labels": {"task": "segmentation3d", "source": "seg"}}  # fmt: skip
        (tmp_path / "cohort.toml").write_text(tomli_w.dumps(cohort))
        report = pull(load_cohort(tmp_path / "cohort.toml"), tmp_path / "site")
    assert report.retrieved == 3
    assert report.skipped == {
        "accession NOSEG": "no SEG series (the labels of a segmentation cohort)",
        "accession OTHER": "its SEG references 4 instances that are not in the image series",
    }
    dataset = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "lesion"}
    assert dataset["task"] == "segmentation3d" and dataset["spatial_dims"] == 3
    for entry in dataset["training"]:
        image = nib.load(tmp_path / "site" / entry["image"])
        mask = np.asarray(nib.load(tmp_path / "site" / entry["label"]).dataobj)
        assert image.shape == mask.shape == (16, 16, 4)
        values = image.get_fdata()
        # the mask lies on the image's bright lesion, slice by slice: not shifted nor flipped
        assert values[mask > 0].min() == 1500 and values[mask == 0].max() == 100
    cfg = tiny_config(task="segmentation3d", image_size=16, class_names="background,lesion",
                      in_channels=1)  # fmt: skip
    loaded = load_site(tmp_path / "site", cfg)
    assert len(loaded.train) + len(loaded.val) == 3 and not loaded.problems


def test_a_query_that_matches_nothing_says_so_and_fails(tmp_path, pacs, capsys):
    path = _cohort(tmp_path, pacs, "dicomweb")
    text = path.read_text().replace("20240101-20241231", "19900101-19901231")
    path.write_text(text)
    assert main(["data", "pull", str(path), "--out", str(tmp_path / "site")]) == 1
    captured = capsys.readouterr()
    assert "0 studies match" in captured.out
    assert "matches no study: check [query]" in captured.err
    assert not (tmp_path / "site").exists(), "no empty site is left to train on"


class _Hostile:
    """The real PACS, with `meddle(into)` run on what each retrieval left."""

    def __init__(self, remote, meddle) -> None:
        self.remote, self.meddle = remote, meddle

    def __getattr__(self, name):
        return getattr(self.remote, name)

    def retrieve(self, study, series, into):
        return self.meddle(into, self.remote.retrieve(study, series, into))


def _foreign_slice(into, headers):
    """Another patient's image, of another study, slipped into the series."""
    import io

    import numpy as np
    from pydicom.uid import generate_uid

    from tests.pacs import instance

    data = instance(generate_uid(), generate_uid(), accession="VICTIM", pixels=np.zeros((32, 32)))
    (into / "slipped.dcm").write_bytes(data)
    return [*headers, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)]


def _lose_one(into, headers):
    sorted(into.glob("*.dcm"))[-1].unlink()
    return headers[:-1]


def _malformed(into, headers):
    raise ValueError("a malformed object")


@pytest.mark.parametrize(
    ("meddle", "why"),
    [(_foreign_slice, "belong to another study or series than the one asked for"),
     (_lose_one, "received 0 of the series' 1 instances (cut off?)"),
     (_malformed, "unusable (ValueError)")],
)  # fmt: skip
def test_what_a_hostile_or_broken_pacs_sends_is_skipped_and_the_pull_goes_on(
    tmp_path, pacs, meddle, why
):
    """The attack review of issue 26: another patient's slices accepted into a study, a
    short series placed as whole, one malformed object stopping every pull."""
    cohort = load_cohort(_cohort(tmp_path, pacs, "dicomweb"))
    report = pull(cohort, tmp_path / "site", remote=_Hostile(connect(cohort.pacs), meddle))
    chest = {study: reason for study, reason in report.skipped.items() if "ACC0" in study}
    assert len(chest) == LABELLED and all(why in reason for reason in chest.values()), chest
    assert report.retrieved == 0 and not (tmp_path / "site" / "imagesTr").exists()
    assert "VICTIM" not in json.dumps(chest)


def test_the_move_receiver_keeps_only_what_the_pacs_sends_for_the_retrieval_under_way(tmp_path):
    from types import SimpleNamespace

    from medfed.client.pacs.dimse import _Keeper, _Receiver

    receiver = _Receiver("127.0.0.1")

    def event(address, study="1.2", series="1.2.3"):
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, "1.2.3.4"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        assoc = SimpleNamespace(is_acceptor=True, requestor=SimpleNamespace(address=address))
        return SimpleNamespace(dataset=ds, file_meta=meta, assoc=assoc)

    assert receiver.store(event("127.0.0.1")) == 0xA700, "no retrieval under way: refused"
    receiver.keeper = _Keeper("1.2", "1.2.3", tmp_path)
    assert receiver.store(event("10.9.8.7")) == 0xA700, "not the PACS's address"
    assert receiver.store(event("127.0.0.1", study="6.6")) == 0xA700, "another study"
    assert receiver.store(event("127.0.0.1")) == 0x0000
    assert len(list(tmp_path.glob("*.dcm"))) == 1


def test_a_password_is_never_sent_in_the_clear_nor_shown(monkeypatch):
    from medfed.client.pacs.dicomweb import DicomWebPacs

    monkeypatch.setenv("MEDFED_PACS_USER", "pacsuser")
    with pytest.raises(PacsError, match="not https: the password would cross the network"):
        DicomWebPacs("http://127.0.0.1:9/dicom-web")
    monkeypatch.delenv("MEDFED_PACS_USER")
    with pytest.raises(PacsError) as refused:
        DicomWebPacs("http://admin:TopSecret@127.0.0.1:9/dicom-web").echo()
    assert "TopSecret" not in str(refused.value) and "admin" not in str(refused.value)
