"""A site's summary for the coordinator's side-by-side view before training.

Privacy: any count of images below `min_count` is replaced by SUPPRESSED at
the site, so a rare class (or a tiny site) is never disclosed exactly. The
intensity histogram is sent as pixel fractions, and only when the site has
at least `min_count` images.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from medfed.client.data.loader import make_loader
from medfed.client.data.site import SiteData
from medfed.client.data.transforms import intensity_mode
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

SUPPRESSED = -1
HISTOGRAM_BINS = 16


def histogram_range(cfg: RunConfig, modality: str) -> tuple[float, float]:
    """Bins over the preprocessed values, so every site's histogram is comparable."""
    return (-3.0, 3.0) if intensity_mode(cfg, modality) == "zscore" else (0.0, 1.0)


def site_statistics(
    site: SiteData, cfg: RunConfig, min_count: int, cache_dir=None
) -> dict[str, int | float | list[int] | list[float]]:
    def guard(count: int) -> int:
        return count if count >= min_count else SUPPRESSED

    entries = site.train + site.val
    facts = [site.facts[e["where"]] for e in entries]
    task = TASKS[cfg.task]
    if task.label_kind == "mask":  # images in which each class appears
        per_class = Counter(v for f in facts for v in f["label-values"])
    else:
        per_class = Counter(task.label_bin(f["label"], cfg) for f in facts)
    stats: dict[str, int | float | list[int] | list[float]] = {
        "num-train": guard(len(site.train)),
        "num-val": guard(len(site.val)),
        "label-histogram": [guard(per_class.get(i, 0)) for i in range(len(task.label_bins(cfg)))],
        "intensity-p1": float(np.median([f["intensity"][1] for f in facts])) if facts else 0.0,
        "intensity-p99": float(np.median([f["intensity"][2] for f in facts])) if facts else 0.0,
    }
    if len(entries) >= min_count:
        low, high = histogram_range(cfg, site.modality)
        counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
        loader = make_loader(
            site,
            entries,
            cfg,
            train=False,
            device=torch.device("cpu"),
            cache_dir=cache_dir,
            workers=0,
        )
        for batch in loader:
            counts += torch.histc(
                batch["image"].double().clamp(low, high), bins=HISTOGRAM_BINS, min=low, max=high
            )
        stats["intensity-histogram"] = [round(v, 4) for v in (counts / counts.sum()).tolist()]
    else:
        stats["intensity-histogram"] = [float(SUPPRESSED)] * HISTOGRAM_BINS
    return stats
