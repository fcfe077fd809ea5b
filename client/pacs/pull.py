"""`medfed data pull`: a cohort from the hospital's PACS into a site folder.

The folder is the one `data check`, simulation and `node start` read
(dataset.json, imagesTr/<study key>/); nothing downstream knows a PACS was
involved. A study's key is a hash of its StudyInstanceUID, so no identifier
names a file; which study is which stays in `.pull/index.json`, at the site.

Safe to rerun and to interrupt: each series is retrieved into
`.pull/partial/`, checked, then renamed into imagesTr/ (nothing half-written is
ever read as a study), the index is written after every study, and a rerun
retrieves only studies the index does not hold. dataset.json is rewritten
(atomically) from the index at the end of every pull.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medfed.client.pacs.cohort import Cohort, Pacs, Query
from medfed.client.pacs.labels import LabelTable, read_labels
from medfed.client.pacs.remote import PacsError, Remote, Series, Study
from medfed.client.pacs.seg_labels import SegMismatch, segment_names, write_pair
from medfed.client.pacs.series_check import NOT_IMAGES, image_entry, series_problem
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.audit import audit

INDEX = Path(".pull") / "index.json"
PARTIAL = Path(".pull") / "partial"
IMAGES, LABELS = "imagesTr", "labelsTr"


def connect(pacs: Pacs) -> Remote:
    """The PACS the cohort names, over its protocol."""
    if pacs.protocol == "dicomweb":
        from medfed.client.pacs.dicomweb import DicomWebPacs

        return DicomWebPacs(pacs.url)
    from medfed.client.pacs.dimse import DimsePacs

    return DimsePacs(pacs)


@dataclass
class PullReport:
    """What a pull did, for the terminal (at the site) and, as counts, the audit log."""

    found: int = 0
    retrieved: int = 0
    already: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # study -> why
    unlabelled: list[str] = field(default_factory=list)  # studies without a label row
    labels_unmatched: list[str] = field(default_factory=list)  # label rows without a study


def study_key(uid: str) -> str:
    """A study's folder name: no identifier, the same on every rerun."""
    return "s" + hashlib.sha256(uid.encode()).hexdigest()[:16]


def pull(
    cohort: Cohort, site: Path, remote: Remote | None = None, min_count: int = 10
) -> PullReport:
    """Retrieve the cohort's new studies into `site` and write its dataset.json."""
    remote = remote or connect(cohort.pacs)
    try:
        state = _pull_all(remote, cohort, site)
    finally:
        remote.close()
    report, index = state.report, state.index
    if index["studies"]:  # a query that matched nothing leaves no site behind
        _write_dataset(site, cohort, state.table, index)
    audit(
        "data-pulled",
        protocol=cohort.pacs.protocol,
        query=cohort.query.to_audit(),
        **{name: _floored(value, min_count) for name, value in _counts(report, index).items()},
    )
    return report


def _pull_all(remote: Remote, cohort: Cohort, site: Path) -> _Pull:
    """Every study the cohort's query matches, through `remote`; what the pull did."""
    csv_labels = cohort.labels is not None and cohort.labels.source == "csv"
    table = read_labels(cohort.labels) if cohort.labels and csv_labels else None
    studies = find_studies(remote, cohort.query)
    index = _load_index(site)
    report = PullReport(found=len(studies))
    if table is not None:
        known = {_label_key(study, cohort) for study in studies}
        report.labels_unmatched = sorted(set(table.by_key) - known)
    state = _Pull(remote, cohort, site, table=table, index=index, report=report)
    new = [s.uid for s in studies if study_key(s.uid) not in index["studies"]
           and study_key(s.uid) not in index["skipped"]]  # fmt: skip
    state.series = remote.series_of_studies(new)
    for study in tqdm(studies, desc="pull", unit="study", disable=None):
        state.study(study)
    return state


def find_studies(remote: Remote, query: Query) -> list[Study]:
    """The studies the query matches, each once, in a stable order."""
    base: dict[str, str] = {}
    if query.study_date:
        base["StudyDate"] = query.study_date
    if query.modality:
        base["ModalitiesInStudy"] = query.modality
    listed = [{"AccessionNumber": a} for a in query.accession_numbers]
    listed += [{"StudyInstanceUID": u} for u in query.study_uids]
    found: dict[str, Study] = {}
    for extra in listed or [{}]:
        for study in remote.studies({**base, **extra}):
            found.setdefault(study.uid, study)
    return [found[uid] for uid in sorted(found)]


def choose_series(series: list[Series], query: Query) -> tuple[Series | None, str]:
    """The study's image series as the query describes it, or None and why not."""
    images = [
        s for s in series
        if s.modality not in NOT_IMAGES
        and (not query.modality or s.modality == query.modality)
        and (not query.body_part or s.body_part.upper() == query.body_part.upper())
        and fnmatch.fnmatch(s.description.lower(), query.series_description.lower())
    ]  # fmt: skip
    if not images:
        kinds = ", ".join(sorted({s.modality or "?" for s in series})) or "none"
        return None, f"no image series matches the query ({len(series)} series: {kinds})"
    return min(images, key=lambda s: (s.number, s.uid)), ""


@dataclass
class _Pull:
    """One pull's state: what every study is pulled with, and what it has done so far."""

    remote: Remote
    cohort: Cohort
    site: Path
    table: LabelTable | None
    index: dict[str, Any]
    report: PullReport
    series: dict[str, list[Series]] = field(default_factory=dict)  # of the new studies

    def study(self, study: Study) -> None:
        """One study: retrieved, checked and moved into place, or skipped with the reason."""
        key, report, index = study_key(study.uid), self.report, self.index
        if key in index["studies"] or key in index["skipped"]:
            report.already += 1
            return
        label = self.table.by_key.get(_label_key(study, self.cohort)) if self.table else None
        if self.table is not None and label is None:
            report.unlabelled.append(describe(study))
            return  # not recorded: a label row added later brings it in on the next pull
        series = self.series.get(study.uid) or self.remote.series(study.uid)
        chosen, why = choose_series(series, self.cohort.query)
        partial = self.site / PARTIAL / key
        entry: dict[str, Any] | None = None
        try:
            if chosen is not None:
                why = self._retrieve(study, chosen, partial)
            if chosen is not None and not why:
                segs = self._segs(series)
                entry = self._pair(study, chosen, segs, partial) if segs is not None else (
                    self._place(study, chosen, partial, label))  # fmt: skip
        except SegMismatch as mismatch:
            why = str(mismatch)
        except PacsError:
            raise  # the PACS itself failed: stop, and the next pull resumes here
        except Exception as error:  # a malformed object: this study only, named by its type
            entry, why = None, f"unusable ({type(error).__name__})"
        finally:
            for leftover in (partial, partial.with_suffix(".seg")):
                shutil.rmtree(leftover, ignore_errors=True)
        if entry is None:
            report.skipped[describe(study)] = why
            index["skipped"][key] = why
        else:
            index["studies"][key] = entry
            report.retrieved += 1
        _save_index(self.site, index)

    def _retrieve(self, study: Study, chosen: Series, partial: Path) -> str:
        """The chosen series into `partial`; why it cannot be the study's image, or ""."""
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted pull left
        (self.site / INDEX).parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # UIDs
        partial.mkdir(parents=True)
        headers = self.remote.retrieve(study.uid, chosen.uid, partial)
        return series_problem(headers, study.uid, chosen.uid, chosen.instances) or ""

    def _segs(self, series: list[Series]) -> list[Series] | None:
        """The study's SEG series, where the cohort's labels are SEGs (None otherwise);
        SegMismatch when it has none."""
        if self.cohort.labels is None or self.cohort.labels.source != "seg":
            return None
        segs = [s for s in series if s.modality == "SEG"]
        if not segs:
            raise SegMismatch("no SEG series (the labels of a segmentation cohort)")
        return segs

    def _place(
        self, study: Study, chosen: Series, partial: Path, label: float | int | None
    ) -> dict[str, Any]:
        """Rename the checked series into imagesTr/; its index entry."""
        final = self.site / IMAGES / study_key(study.uid)
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(final)
        entry = {"study": study.uid, "series": chosen.uid, "modality": chosen.modality,
                 "image": str(image_entry(final).relative_to(self.site))}  # fmt: skip
        return entry if label is None else {**entry, "label": label}

    def _pair(
        self, study: Study, chosen: Series, segs: list[Series], partial: Path
    ) -> dict[str, Any]:
        """The image and its SEG as a NIfTI pair in imagesTr/ and labelsTr/; its index
        entry. The first SEG of the cohort names its classes; a SEG naming others is
        refused (SegMismatch), as is one that does not fit its image."""
        key, seg_folder = study_key(study.uid), partial.with_suffix(".seg")
        seg_folder.mkdir(parents=True, exist_ok=True)
        self.remote.retrieve(study.uid, min(segs, key=lambda s: (s.number, s.uid)).uid, seg_folder)
        seg_file = next(iter(sorted(seg_folder.glob("*.dcm"))), None)
        if seg_file is None:
            raise SegMismatch("its SEG series sent no instance")
        names = ("background", *segment_names(seg_file))
        known = tuple(self.index.setdefault("classes", list(names)))
        if names != known:
            raise SegMismatch(f"its SEG's segments {', '.join(names[1:])} differ from the "
                              f"cohort's {', '.join(known[1:])}")  # fmt: skip
        image, label = f"{IMAGES}/{key}.nii.gz", f"{LABELS}/{key}.nii.gz"
        written = (seg_folder / "image.nii.gz", seg_folder / "label.nii.gz")
        write_pair(partial, seg_file, *written)  # both whole before either is in place
        for done, final in zip(written, (image, label), strict=True):
            (self.site / final).parent.mkdir(parents=True, exist_ok=True)
            done.replace(self.site / final)
        return {"study": study.uid, "series": chosen.uid, "modality": chosen.modality,
                "image": image, "label": label}  # fmt: skip


def _label_key(study: Study, cohort: Cohort) -> str:
    assert cohort.labels is not None
    return study.accession if cohort.labels.key == "AccessionNumber" else study.uid


def _load_index(site: Path) -> dict[str, Any]:
    path = site / INDEX
    return json.loads(path.read_text()) if path.is_file() else {"studies": {}, "skipped": {}}


def _save_index(site: Path, index: dict[str, Any]) -> None:
    (site / INDEX).parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # study UIDs inside
    atomic_write(site / INDEX, json.dumps(index, indent=1).encode())


def _floored(value: int, floor: int) -> int | str:
    """A count the audit log may hold: below the site's floor, only that it is."""
    return value if value == 0 or value >= floor else f"below {floor}"


def _counts(report: PullReport, index: dict[str, Any]) -> dict[str, int]:
    return {
        "studies-found": report.found,
        "retrieved": report.retrieved,
        "already-held": report.already,
        "skipped": len(report.skipped),
        "unlabelled": len(report.unlabelled),
        "label-rows-without-study": len(report.labels_unmatched),
        "site-studies": len(index["studies"]),
    }


def _write_dataset(
    site: Path, cohort: Cohort, table: LabelTable | None, index: dict[str, Any]
) -> None:
    """dataset.json from every study the index holds (this pull's and earlier ones')."""
    entries = index["studies"]
    training = [
        {"image": entry["image"], **({"label": entry["label"]} if "label" in entry else {})}
        for _, entry in sorted(entries.items())
    ]
    modalities = sorted({entry["modality"] for entry in entries.values()}) or ["OT"]
    dataset: dict[str, Any] = {
        "name": site.name,
        "task": cohort.labels.task if cohort.labels else "",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "numTraining": len(training),
        "training": training,
        "test": [],
        "pulled-from": {"protocol": cohort.pacs.protocol, "query": cohort.query.to_audit()},
    }
    classes = table.classes if table is not None else tuple(index.get("classes", ()))
    if classes:
        dataset["labels"] = {str(i): name for i, name in enumerate(classes)}
    if cohort.labels is not None and cohort.labels.source == "seg":
        dataset["spatial_dims"] = 3 if cohort.labels.task == "segmentation3d" else 2
    atomic_write(site / "dataset.json", json.dumps(dataset, indent=2).encode())


def describe(study: Study) -> str:
    """A study as the site's own terminal names it (never written to the audit log)."""
    return f"accession {study.accession}" if study.accession else f"study {study.uid}"


def describe_report(report: PullReport, site: Path) -> list[str]:
    """What the pull did, line by line, for the site's own terminal."""
    lines = [
        f"{report.found} studies match; {report.retrieved} retrieved, {report.already} already "
        f"held or skipped before, {len(report.skipped)} skipped now"
    ]
    lines += [f"  skipped {study}: {why}" for study, why in sorted(report.skipped.items())]
    if report.unlabelled:
        lines.append(
            f"{len(report.unlabelled)} studies have no label row, left out: "
            + ", ".join(report.unlabelled[:10])
            + (" ..." if len(report.unlabelled) > 10 else "")
        )
    if report.labels_unmatched:
        lines.append(
            f"{len(report.labels_unmatched)} label rows name no study of the cohort: "
            + ", ".join(report.labels_unmatched[:10])
            + (" ..." if len(report.labels_unmatched) > 10 else "")
        )
    lines.append(f"site folder: {site} (next: medfed data check {site})")
    return lines
