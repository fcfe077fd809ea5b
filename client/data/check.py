"""`medfed data check DIR`: what a site folder holds and whether a node can train on it.

Runs the exact loading and scanning code a node runs, without training, and
writes data_report.json and samples.png next to a readable summary.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from medfed.client.data.manifest import (
    SiteDataError,
    declared_classes,
    find_manifest,
    read_rows,
)
from medfed.client.data.site import SiteDataset, scan_site
from medfed.client.data.transforms import intensity_mode, site_transforms
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.task_descriptions import SITE_DATA_TASKS
from medfed.shared_models.tasks import TASKS

REPORT = "data_report.json"
SAMPLES = "samples.png"


def site_config(root: Path, task: str | None) -> tuple[RunConfig, str | None]:
    """The task and classes a site declares (dataset.json), overridable by --task; with a
    line saying so when the task was inferred from the labels instead."""
    declared: dict[str, Any] = {}
    manifest = find_manifest(root)
    if manifest.suffix == ".json":
        try:
            declared = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            declared = {}  # scan_site reports the broken file with its position
        if not isinstance(declared, dict):
            declared = {}  # scan_site reports a top level that is not an object
    task = task or declared.get("task")
    inferred = None
    if task is None:
        task, inferred = infer_task(root, manifest)
    values: dict[str, Any] = {"task": task}
    classes = declared_classes(declared.get("labels"))
    if classes:
        values["class-names"] = ",".join(classes)
    return RunConfig.from_mapping(values), inferred


def infer_task(root: Path, manifest: Path) -> tuple[str, str]:
    """Classification when every label is an integer, regression when every label is a
    number and some are not integers (what a CSV manifest of X-rays holds), with the line
    that says so; ConfigError naming the site otherwise."""
    rows = [] if manifest.suffix == ".npz" else list(_labels(read_rows(manifest)))
    numbers = [_number(label) for label in rows]
    if rows and None not in numbers:
        integers = all(isinstance(n, int) for n in numbers)
        task = "classification" if integers else "regression"
        kind = "integer" if integers else "non-integer"
        line = (
            f"task {task}: inferred from the {kind} labels in {manifest.name} (--task overrides it)"
        )
        return task, line
    if manifest.suffix == ".npz":
        reason = f"{manifest.name} names none"
    elif not rows:
        reason = f"{manifest.name} names none and holds no labels to infer it from"
    else:
        first = rows[numbers.index(None)]
        reason = f"{manifest.name} names none and its labels are not all numbers: {first!r}"
    raise ConfigError(
        f"{root}: cannot tell the task ({reason}); pass --task {'|'.join(SITE_DATA_TASKS)}"
    )


def _labels(raw: dict[str, Any]) -> Iterator[Any]:
    for rows in raw["splits"].values():
        for _, row in rows:
            if isinstance(row, dict) and "label" in row:
                yield row["label"]


def _number(label: Any) -> int | float | None:
    """An integer or a finite number as a manifest writes it (JSON number or CSV text)."""
    if isinstance(label, str):
        for kind in (int, float):
            try:
                label = kind(label.strip())
                break
            except ValueError:
                continue
    if isinstance(label, bool) or not isinstance(label, int | float):
        return None
    return label if isinstance(label, int) or math.isfinite(label) else None


def check_site(root: Path, task: str | None = None) -> dict[str, Any]:
    """The report as a dict; `usable` says whether a node could train on this folder."""
    root = root.expanduser().resolve()
    report: dict[str, Any] = {"site": str(root), "usable": False, "blocking": []}
    try:
        cfg, inferred = site_config(root, task)
        if inferred:
            report["inferred"] = inferred
        site = scan_site(root, cfg)
    except (SiteDataError, ConfigError) as err:
        report["blocking"].append(str(err))
        return report
    report.update(_describe(site, cfg))
    if not site.train or not site.val:
        report["blocking"].append(
            f"not enough usable images: {len(site.train)} for training and {len(site.val)} "
            "for validation after skipping the problems listed (need at least 1 each)"
        )
    report["usable"] = not report["blocking"]
    return report


def _describe(site: SiteDataset, cfg: RunConfig) -> dict[str, Any]:
    task = TASKS[cfg.task]
    usable = site.train + site.val + site.test
    facts = [site.facts[e["where"]] for e in usable]
    described: dict[str, Any] = {
        "manifest": site.source.name,
        "task": cfg.task,
        "modality": site.modality,
        "intensity-normalisation": intensity_mode(cfg, site.modality),
        "classes": list(cfg.classes),
        "counts": {
            "train": len(site.train),
            "val": len(site.val),
            "test": len(site.test),
            "skipped": len(site.problems),
        },
        "shapes": _counts(tuple(f["shape"]) for f in facts),
        "spacings": _counts(tuple(f["spacing"]) for f in facts if f.get("spacing")),
        "channels": _counts(f["channels"] for f in facts),
        "problems": [{"file": p.where, "reason": p.reason} for p in site.problems],
    }
    if facts:
        described["intensity"] = {
            "min": min(f["intensity"][0] for f in facts),
            "p1-median": statistics.median(f["intensity"][1] for f in facts),
            "p99-median": statistics.median(f["intensity"][2] for f in facts),
            "max": max(f["intensity"][3] for f in facts),
        }
    if task.label_kind in ("class", "value"):
        histogram = Counter(task.label_bin(f["label"], cfg) for f in facts)
        described["label-histogram"] = {
            n: histogram.get(i, 0) for i, n in enumerate(task.label_bins(cfg))
        }
        if task.label_kind == "value" and facts:
            values = [f["label"] for f in facts]
            described["label-range"] = [min(values), statistics.median(values), max(values)]
    else:
        present = Counter(v for f in facts for v in f["label-values"])
        described["label-coverage"] = {
            n: present.get(i, 0) for i, n in enumerate(cfg.classes)
        }  # images containing it
    return described


def _counts(values: Any) -> dict[str, int]:
    return {
        "x".join(str(v) for v in k) if isinstance(k, tuple) else str(k): n
        for k, n in Counter(values).most_common()
    }


def print_report(report: dict[str, Any]) -> None:
    """The report as a hospital reads it: counts, labels, shapes, problems, the verdict."""
    print(f"site: {report['site']}")
    if "inferred" in report:
        print(f"  {report['inferred']}")
    if "counts" in report:
        c = report["counts"]
        print(
            f"  manifest {report['manifest']}, task {report['task']}, modality "
            f"{report['modality']} (intensity: {report['intensity-normalisation']})"
        )
        print(
            f"  images: {c['train']} train, {c['val']} validation, {c['test']} test, "
            f"{c['skipped']} skipped"
        )
        labels = report.get("label-histogram") or report.get("label-coverage") or {}
        kind = "labels" if "label-histogram" in report else "images containing"
        print(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
        print("  shapes: " + ", ".join(f"{k} ({v})" for k, v in report["shapes"].items()))
        if report["spacings"]:
            print("  spacings: " + ", ".join(f"{k} ({v})" for k, v in report["spacings"].items()))
        if "intensity" in report:
            i = report["intensity"]
            print(
                f"  intensity: min {i['min']:.4g}, median p1 {i['p1-median']:.4g}, "
                f"median p99 {i['p99-median']:.4g}, max {i['max']:.4g}"
            )
        for problem in report["problems"]:
            print(f"  skipped {problem['file']}: {problem['reason']}")
    for blocking in report["blocking"]:
        print(f"  BLOCKING: {blocking}")
    print("  usable: " + ("yes" if report["usable"] else "no"))


def save_samples(root: Path, report: dict[str, Any], path: Path, count: int = 8) -> None:
    """A grid of usable images as the network will see them, with their labels."""
    cfg, _ = site_config(root, report["task"])
    site = scan_site(root, cfg)
    entries = (site.train + site.val)[:count]
    if not entries:
        return
    transform = site_transforms(
        cfg, site.modality, train=False, array_channel_dim=site.array_channel_dim
    )
    fig, axes = plt.subplots(1, len(entries), figsize=(2.1 * len(entries), 2.5), squeeze=False)
    for axis, entry in zip(axes[0], entries, strict=True):
        item = transform(dict(entry))
        image = middle_slice(item["image"][0])
        axis.imshow(image.T, cmap="gray")
        axis.axis("off")
        if TASKS[cfg.task].label_kind == "mask":
            levels = [k + 0.5 for k in range(len(cfg.classes) - 1)]
            mask = middle_slice(item["label"][0])
            axis.contour(mask.T, levels=levels, colors="yellow", linewidths=0.8)
            axis.set_title(Path(entry["where"]).name, fontsize=7)
        else:
            label = entry["label"]
            shown = f"{label:g}" if isinstance(label, float) else cfg.classes[label]
            axis.set_title(f"{shown}\n{Path(entry['where']).name}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def middle_slice(volume):
    """A 2D image as is; the middle axial slice of a volume."""
    return volume if volume.dim() == 2 else volume[..., volume.shape[-1] // 2]


def run_check(root: Path, task: str | None, out: Path | None) -> int:
    """Print, and with `out` write the report and samples (nothing is written where the
    command was run unless asked); 0 when a node can train on this folder."""
    report = check_site(root, task)
    print_report(report)
    if out is None:
        print("(--out DIR writes this report as data_report.json, with samples.png)")
        return 0 if report["usable"] else 1
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2))
    if report["usable"]:
        save_samples(root, report, out / SAMPLES)
    print(f"report: {out / REPORT}" + (f", samples: {out / SAMPLES}" if report["usable"] else ""))
    return 0 if report["usable"] else 1
