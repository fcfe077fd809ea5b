"""Federated statistics, the hospital's half: what one site counts about its data.

The counts here are exact; they never leave the site as they are: the query
handler's `small_count_mod` (client/privacy/filters.py) writes them, on the
reply's way out, as the site's one decision on its counts shows them
(client/privacy/disclosure.py). The intensity
histogram is in pixel fractions over the preprocessed values, so every
site's histogram is comparable.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from medfed.client.data.loader import make_loader
from medfed.client.data.site import SiteDataset
from medfed.client.data.transforms import intensity_mode
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Statistic
from medfed.shared_models.tasks import TASKS

HISTOGRAM_BINS = 16


def histogram_range(cfg: RunConfig, modality: str) -> tuple[float, float]:
    """Bins over the preprocessed values: z-scores, or intensities scaled to [0, 1]."""
    return (-3.0, 3.0) if intensity_mode(cfg, modality) == "zscore" else (0.0, 1.0)


def site_summary(
    site: SiteDataset, cfg: RunConfig, cache_dir: Path | None = None
) -> dict[str, int | float | list[int] | list[float]]:
    """Image counts per split and per class, intensity percentiles and histogram."""
    entries = site.train + site.val
    facts = [site.facts[e["where"]] for e in entries]
    task = TASKS[cfg.task]
    if task.label_kind == "mask":  # images in which each class appears
        per_class = Counter(v for f in facts for v in f["label-values"])
    else:
        per_class = Counter(task.label_bin(f["label"], cfg) for f in facts)
    bins = len(task.label_bins(cfg))
    return {
        Statistic.NUM_TRAIN: len(site.train),
        Statistic.NUM_VAL: len(site.val),
        Statistic.LABEL_HISTOGRAM: [per_class.get(i, 0) for i in range(bins)],
        Statistic.INTENSITY_P1: _median([f["intensity"][1] for f in facts]),
        Statistic.INTENSITY_P99: _median([f["intensity"][2] for f in facts]),
        Statistic.INTENSITY_HISTOGRAM: _intensity_histogram(site, entries, cfg, cache_dir),
    }


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else 0.0


def _intensity_histogram(
    site: SiteDataset, entries: list[dict], cfg: RunConfig, cache_dir: Path | None
) -> list[float]:
    """Fractions of preprocessed pixel values in HISTOGRAM_BINS equal bins."""
    low, high = histogram_range(cfg, site.modality)
    counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
    loader = make_loader(
        site, entries, cfg, train=False, device=torch.device("cpu"), cache_dir=cache_dir, workers=0
    )
    for batch in loader:
        counts += torch.histc(
            batch["image"].double().clamp(low, high), bins=HISTOGRAM_BINS, min=low, max=high
        )
    return (
        [round(v, 4) for v in (counts / counts.sum()).tolist()]
        if counts.sum()
        else [0.0] * HISTOGRAM_BINS
    )
