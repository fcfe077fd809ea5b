"""One hospital's usable data: manifest read, every file scanned, splits fixed.

Training goes ahead as long as usable images remain; each skipped file is
kept as a Problem (reported locally by name, counted in the reply metrics).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.client.data.manifest import Problem, SiteDataError, declared_classes, read_manifest
from medfed.client.data.scan import Scanner, ScanSpec
from medfed.client.data.split import validation_count
from medfed.client.data.transforms import resolve_modality
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

__all__ = ["SiteDataError", "SiteDataset", "carve_validation", "load_site", "scan_site"]


@dataclass
class SiteDataset:
    """One hospital's usable entries, split into train, validation and test, with the
    files it skipped and what the scan learnt about each image."""

    name: str
    root: Path
    source: Path  # the manifest that was read
    modality: str
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    array_channel_dim: str | int | None = None  # set for in-memory (.npz) sites


def load_site(
    root: Path, cfg: RunConfig, name: str | None = None, cache_dir: Path | None = None
) -> SiteDataset:
    """The site, ready to train: raises SiteDataError when too little usable data remains."""
    site = scan_site(root, cfg, name, cache_dir)
    if not site.train or not site.val:
        usable = len(site.train) + len(site.val) + len(site.test)
        first = f"; first: {site.problems[0]}" if site.problems else ""
        raise SiteDataError(
            f"{site.root}: not enough usable data to train and validate "
            f"({usable} usable entries, {len(site.problems)} skipped{first})"
        )
    return site


def carve_validation(
    entries: list[dict[str, Any]], cfg: RunConfig, key: Callable[[dict[str, Any]], str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation): `val-fraction` of the entries (at least one, and one left to
    train on), drawn with the run's seed from the entries in `key` order, so every
    message of a run sees the same split."""
    if len(entries) < 2:
        return entries, []
    order = sorted(range(len(entries)), key=lambda i: key(entries[i]))
    random.Random(cfg.seed).shuffle(order)
    n_val = validation_count(len(entries), cfg.val_fraction)
    return [entries[i] for i in order[n_val:]], [entries[i] for i in order[:n_val]]


def scan_site(
    root: Path, cfg: RunConfig, name: str | None = None, cache_dir: Path | None = None
) -> SiteDataset:
    """Everything found in the site, usable or not (what `medfed data check` reports).

    Raises SiteDataError only when the manifest itself cannot be used.
    """
    root = root.expanduser().resolve()
    task = TASKS[cfg.task]
    manifest = read_manifest(root, task.label_kind, len(cfg.classes), cfg.max_image_megabytes)
    if manifest.labels is not None and declared_classes(manifest.labels) != list(cfg.classes):
        raise SiteDataError(
            f"{manifest.source}: labels {manifest.labels} do not match the run's classes "
            f"{list(cfg.classes)} (config key 'class-names')"
        )
    spec = ScanSpec(
        task.label_kind,
        len(cfg.classes),
        task.spatial_dims,
        cfg.in_channels,
        cfg.max_image_megabytes,
    )
    everything = [e for split in ("train", "val", "test") for e in manifest.splits[split]]
    usable, problems, facts = Scanner(spec, cache_dir).scan(everything)
    kept = {id(e) for e in usable}
    split = {s: [e for e in manifest.splits[s] if id(e) in kept] for s in manifest.splits}
    train, val = split["train"], split["val"]
    if not val:  # no declared validation split: carve one, seeded
        train, val = carve_validation(train, cfg, key=lambda entry: entry["where"])
    channel_dim = None
    if train and not isinstance(train[0]["image"], str):
        channel_dim = "no_channel" if train[0]["image"].ndim == task.spatial_dims else -1
    return SiteDataset(
        name=name or root.name,
        root=root,
        source=manifest.source,
        modality=resolve_modality(cfg, manifest.modality),
        train=train,
        val=val,
        test=split["test"],
        problems=manifest.problems + problems,
        facts=facts,
        array_channel_dim=channel_dim,
    )
