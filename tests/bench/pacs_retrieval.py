"""Retrieving a cohort from a PACS: `medfed data pull` against the plain client loops.

    python -m tests.bench.pacs_retrieval [--studies 200] [--slices 5] [--repeats 2]

One local Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) holds `--studies` studies
of one CT series each (`--slices` slices of 128 x 128). In one invocation, alternating,
`--repeats` times each:

- DICOMweb: medfed's pull against `dicomweb-client` retrieving the same series in one
  loop (`retrieve_series`, each instance written to disk), its plain use;
- DIMSE: medfed's pull (C-MOVE) against `pynetdicom` C-MOVE of the same studies on one
  association to a storage SCP writing each instance (the baseline's best setting: one
  association for all, not one per study); medfed's C-GET is measured beside them.

medfed's pull also queries (QIDO-RS / C-FIND), checks every series' headers and builds
the site folder: the ratio is the baseline's time over medfed's (1.0: as fast). Writes
pacs_retrieval.json. Orthanc is started and stopped by pid.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tomli_w
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from medfed.client.pacs.cohort import load_cohort
from medfed.client.pacs.pull import pull
from medfed.client.pacs.remote import save_instance
from tests.bench.runs import print_table, save_results
from tests.pacs import CT, NODE_AE, PACS_AE, Orthanc, instance, orthanc


def load(pacs: Orthanc, studies: int, slices: int) -> list[tuple[str, str]]:
    """`studies` one-series CT studies in the PACS; their (study, series) UIDs."""
    rng = np.random.default_rng(0)
    uids = []
    for s in range(studies):
        study, series = generate_uid(), generate_uid()
        for k in range(slices):
            pixels = rng.integers(0, 2000, (128, 128))
            pacs.upload(instance(study, series, sop_class=CT, modality="CT", accession=f"B{s:04d}",
                                 description="AX", pixels=pixels, number=k + 1,
                                 position=float(k)))  # fmt: skip
        uids.append((study, series))
    return uids


def dicomweb_baseline(pacs: Orthanc, uids: list[tuple[str, str]], into: Path) -> None:
    client = DICOMwebClient(pacs.dicomweb)
    for study, series in uids:
        folder = into / series
        folder.mkdir(parents=True)
        for ds in client.retrieve_series(study, series):
            save_instance(ds, folder)


def dimse_baseline(pacs: Orthanc, uids: list[tuple[str, str]], into: Path) -> None:
    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        folder = into / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        save_instance(ds, folder)
        return 0x0000

    scp = AE(ae_title=NODE_AE)
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", pacs.node_port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, store)])  # fmt: skip
    try:
        ae = AE(ae_title=NODE_AE)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=PACS_AE)
        for study, _ in uids:
            query = Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
            for _status, _ in assoc.send_c_move(
                query, NODE_AE, StudyRootQueryRetrieveInformationModelMove
            ):
                pass
        assoc.release()
    finally:
        server.shutdown()


def medfed_pull(pacs: Orthanc, work: Path, protocol: str, retrieve: str) -> Callable:
    path = work / f"cohort-{protocol}-{retrieve}.toml"
    path.write_text(tomli_w.dumps({"pacs": pacs.pacs_table(protocol, retrieve),
                                   "query": {"modality": "CT"}}))  # fmt: skip
    cohort = load_cohort(path)

    def run(uids: list[tuple[str, str]], into: Path) -> None:
        report = pull(cohort, into)
        assert report.retrieved == len(uids), report

    return run


def timed(run: Callable, uids: list[tuple[str, str]], into: Path, slices: int) -> float:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    started = time.perf_counter()
    run(uids, into)
    seconds = time.perf_counter() - started
    files = sum(1 for _ in into.rglob("*.dcm"))
    assert files == len(uids) * slices, f"{files} files retrieved"
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="medfed-pacs-bench-") as tmp:
        work = Path(tmp)
        with orthanc(work / "orthanc") as pacs:
            started = time.perf_counter()
            uids = load(pacs, ARGS.studies, ARGS.slices)
            print(f"loaded {len(uids)} series into Orthanc in {time.perf_counter() - started:.0f}s")
            cases = {
                "dicomweb-client loop": lambda u, i: dicomweb_baseline(pacs, u, i),
                "medfed pull (DICOMweb)": medfed_pull(pacs, work, "dicomweb", "get"),
                "pynetdicom C-MOVE loop": lambda u, i: dimse_baseline(pacs, u, i),
                "medfed pull (C-MOVE)": medfed_pull(pacs, work, "dimse", "move"),
                "medfed pull (C-GET)": medfed_pull(pacs, work, "dimse", "get"),
            }
            seconds: dict[str, list[float]] = {name: [] for name in cases}
            for repeat in range(ARGS.repeats):
                for name, run in cases.items():
                    seconds[name].append(timed(run, uids, work / "into", ARGS.slices))
                    print(f"repeat {repeat + 1}: {name}: {seconds[name][-1]:.1f}s", flush=True)
    mean = {name: statistics.fmean(values) for name, values in seconds.items()}
    ratios = {
        "dicomweb": mean["dicomweb-client loop"] / mean["medfed pull (DICOMweb)"],
        "dimse-move": mean["pynetdicom C-MOVE loop"] / mean["medfed pull (C-MOVE)"],
        "dimse-get-vs-move-baseline": mean["pynetdicom C-MOVE loop"] / mean["medfed pull (C-GET)"],
    }
    series = ARGS.studies
    rows = [[name, f"{mean[name]:.1f}", f"{series / mean[name]:.1f}"] for name in cases]
    print_table({"case": 26, "seconds": 8, "series/s": 9}, rows)
    for name, value in ratios.items():
        print(f"throughput ratio {name}: {value:.2f} (baseline time / medfed time)")
    results = {"studies": ARGS.studies, "slices": ARGS.slices, "repeats": ARGS.repeats,
               "seconds": seconds, "mean-seconds": mean, "ratios": ratios}  # fmt: skip
    print(f"wrote {save_results(ARGS.out, 'pacs_retrieval.json', results)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."))
    ARGS = parser.parse_args()
    main()
