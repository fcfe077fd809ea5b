"""`medfed predict`: read studies, run the global model, write results a viewer or a script opens.

Outputs in `--out`: segmentation masks as NIfTI in each input's own geometry
(masks/), a DICOM SEG for DICOM input (seg/), a PNG overlay per case
(overlays/), predictions.csv for image-level tasks, and predictions.json
listing every input written or skipped, with the reason.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medfed.client.data.transforms import resolve_modality
from medfed.client.handlers import pick_device
from medfed.client.local_layers import site_model
from medfed.client.pacs.cohort import Cohort, load_cohort
from medfed.client.predict.dicom_seg import write_dicom_seg
from medfed.client.predict.inputs import collect_cases
from medfed.client.predict.pipeline import Prediction, Predictor, reason
from medfed.client.predict.push import pull_inputs, push_results
from medfed.client.predict.writers import (
    SaveNiftiMaskd,
    mask_in_input_shape,
    new_output_folder,
    write_overlay,
    write_table,
)
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import (
    load_global_model,
    read_model_config,
    recorded_bundle_sha256,
)
from medfed.shared_models.tasks import TASKS

SUMMARY = "predictions.json"
TABLE = "predictions.csv"


@dataclass
class PredictOptions:
    model: Path  # a finished run folder
    input: list[Path]
    out: Path
    device: str = "auto"
    batch_size: int = 4
    site_layers: Path | None = None  # FedBN: a hospital's kept normalisation layers
    cohort: Path | None = None  # a cohort file: its studies from the PACS are inputs too
    push: bool = False  # store the results in the cohort's PACS (SEG, SR)


def run_predict(options: PredictOptions) -> int:
    """Predict every input; 0 when at least one was written, 1 when none could be.

    `--out` must be new or empty: results of an earlier call left beside this call's
    would pass for them (a study skipped now keeps its old mask)."""
    if options.batch_size < 1:
        raise ValueError(f"--batch-size {options.batch_size}: expected a positive number")
    cohort = _cohort(options)  # first: a bad cohort file writes nothing
    run_dir = options.model.expanduser()
    if read_model_config(run_dir).task == "bundle":  # refused before any of a bundle is read
        raise ValueError(
            f"{options.model}: a task = bundle run (bundle sha256 "
            f"{recorded_bundle_sha256(run_dir)}) predicts through its bundle's own inference "
            "config, which medfed does not run: `medfed export RUN_DIR --out DIR` gives the "
            "bundle with the federated weights (its hash approved at this site, or --bundle PATH)"
        )
    cfg, net = load_global_model(run_dir)
    if cfg.task == "gan":
        raise ValueError(f"{options.model}: a gan run generates images: use `medfed gan sample`")
    device = pick_device(options.device)
    new_output_folder(options.out)
    caveat = site_model(cfg, net, options.site_layers)
    if caveat:
        print(f"medfed: warning: {caveat}", file=sys.stderr)
    skipped: dict[str, str] = {}
    options.out.mkdir(parents=True, exist_ok=True)
    inputs = list(options.input) + ([pull_inputs(cohort, options.out)] if cohort else [])
    cases = collect_cases(inputs, cfg, skipped)
    written: list[dict[str, Any]] = []
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        case["modality"] = resolve_modality(cfg, case["modality"])
        by_modality.setdefault(case["modality"], []).append(case)
    with tqdm(total=len(cases), desc="predict", unit="study") as progress:
        for modality, group in by_modality.items():
            predictor = Predictor(cfg, net, modality, device)
            done = 0
            for prediction in predictor.predict(group, options.batch_size, skipped):
                written.append(_write(prediction, cfg, options.out))
                done += 1
                progress.update()
            progress.update(len(group) - done)  # the skipped ones
    if written and TASKS[cfg.task].label_kind != "mask":
        write_table([w["row"] for w in written], options.out / TABLE)
    if cohort is not None and options.push:
        stored = push_results(cohort, written, options.out, run_dir.name)
        print(f"pushed {stored} results (DICOM SEG / SR) to the PACS of {options.cohort}")
    _summarise(options, cfg, written, skipped, caveat)
    return 0 if written else 1


def _cohort(options: PredictOptions) -> Cohort | None:
    """The cohort --cohort names; --push without one, or no input at all, is refused."""
    if options.push and options.cohort is None:
        raise ValueError("--push stores results in the PACS a --cohort file names: give one")
    if not options.input and options.cohort is None:
        raise ValueError("--input or --cohort: the studies to predict")
    missing = [str(p) for p in options.input if not p.expanduser().exists()]
    if missing and len(missing) == len(options.input) and options.cohort is None:
        # nothing to predict: refused before --out is made, so the same command can be rerun
        raise ValueError(f"--input {' '.join(missing)}: no such file or folder")
    return load_cohort(options.cohort) if options.cohort else None


def _write(prediction: Prediction, cfg: RunConfig, out: Path) -> dict[str, Any]:
    """One study's files (segmentation) or table row (image-level tasks)."""
    case = prediction.case
    record: dict[str, Any] = {k: case[k] for k in ("input", "name", "modality")}
    kind = TASKS[cfg.task].label_kind
    if kind != "mask":
        record["row"] = _row(prediction, cfg, kind)
        record["sources"] = case["sources"]  # what an SR of it references (--push)
        return record
    output = prediction.output
    mask = output.argmax(dim=0).numpy().astype(np.uint8)
    mask = mask_in_input_shape(mask, tuple(prediction.image.meta["spatial_shape"]))
    affine = _affine4(np.asarray(output.affine))
    path = out / "masks" / f"{case['name']}.nii.gz"
    record["mask"] = str(SaveNiftiMaskd.write(mask, affine, path))
    if case["sources"]:
        seg = out / "seg" / f"{case['name']}.dcm"
        seg.parent.mkdir(parents=True, exist_ok=True)
        try:
            sources = [Path(p) for p in case["sources"]]
            write_dicom_seg(mask, affine, sources, list(cfg.classes), seg)
            record["dicom-seg"] = str(seg)
        except Exception as err:  # a source a SEG cannot reference: the mask stands alone
            record["dicom-seg-not-written"] = reason(err)
    overlay = out / "overlays" / f"{case['name']}.png"
    record["overlay"] = str(
        write_overlay(prediction.image, prediction.preview, cfg.classes, overlay)
    )
    record["voxels"] = {name: int((mask == k).sum()) for k, name in enumerate(cfg.classes) if k > 0}
    return record


def _row(prediction: Prediction, cfg: RunConfig, kind: str) -> dict[str, Any]:
    values = prediction.output.view(-1).tolist()
    row: dict[str, Any] = {"input": prediction.case["input"]}
    if kind == "value":  # the run's value name says what it measures, unit included
        row.update({"quantity": cfg.classes[0], "value": round(values[0], 6)})
        return row
    row["predicted"] = cfg.classes[int(np.argmax(values))]
    row.update(
        {f"probability-{name}": round(p, 6) for name, p in zip(cfg.classes, values, strict=True)}
    )
    return row


def _affine4(affine: np.ndarray) -> np.ndarray:
    """A 2D reader's 3x3 affine as NIfTI's 4x4 (the slice at z = 0)."""
    if affine.shape == (4, 4):
        return affine
    full = np.eye(4)
    full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
    return full


def _summarise(
    options: PredictOptions,
    cfg: RunConfig,
    written: list[dict[str, Any]],
    skipped: dict[str, str],
    caveat: str | None,
) -> None:
    """predictions.json, and what was written or skipped, on the console."""
    summary = {
        "model": str(options.model),
        "task": cfg.task,
        "classes": list(cfg.classes),
        **({"warning": caveat} if caveat else {}),
        **({"site-layers": str(options.site_layers)} if options.site_layers else {}),
        "written": [{k: v for k, v in w.items() if k != "row"} for w in written],
        "skipped": [{"input": path, "reason": why} for path, why in skipped.items()],
    }
    (options.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"predicted {len(written)} {'study' if len(written) == 1 else 'studies'} into "
          f"{options.out}", end="")  # fmt: skip
    print(f" ({TABLE})" if written and TASKS[cfg.task].label_kind != "mask" else "")
    if skipped:
        print(f"skipped {len(skipped)} unreadable inputs (listed in {SUMMARY}):")
        for path, why in skipped.items():
            print(f"  {path}: {why}")
    for record in written:
        if "dicom-seg-not-written" in record:
            print(f"  {record['input']}: no DICOM SEG: {record['dicom-seg-not-written']}")
