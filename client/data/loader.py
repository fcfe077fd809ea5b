"""DataLoaders over a site's splits, with the deterministic transforms cached on disk.

In deployment every round runs the ClientApp in a fresh process, so an
in-memory cache would be rebuilt each round; MONAI's PersistentDataset keeps
the decoded, normalised, resized images under the node's cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import monai
import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset
from torch.utils.data import ConcatDataset, RandomSampler

from medfed.client.data.scan import SCAN_VERSION
from medfed.client.data.site import SiteDataset
from medfed.client.data.transforms import intensity_mode, site_transforms
from medfed.shared_models.config import RunConfig


def loader_workers(device: torch.device, requested: int | None = None) -> int:
    """Worker processes: none on small machines, more when a GPU must be fed."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0))
    if cpus <= 2:
        return 0
    return min(8 if device.type == "cuda" else 4, cpus // 2)


def transform_cache_dir(cache_dir: Path, cfg: RunConfig, site: SiteDataset, train: bool) -> Path:
    """One cache folder per preprocessing recipe: change a setting, get a fresh cache.

    Training and evaluation pipelines cache different stages (up to the first random
    transform, or the whole pipeline), so each has its own folder: an image that is
    in the training split under one seed and in the validation split under another
    must not be served the other pipeline's cached stage.
    """
    recipe = {
        "pipeline": "train" if train else "evaluate",
        "task": cfg.task, "image-size": cfg.image_size, "in-channels": cfg.in_channels,
        "modality": site.modality, "intensity": intensity_mode(cfg, site.modality),
        "ct-window": cfg.ct_window, "spacing": cfg.spacing, "fit": cfg.fit,
        "monai": monai.__version__, "scan": SCAN_VERSION,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"transforms-{digest}"


def _entry_hash(item: Any) -> bytes:
    """Cache key: the file fingerprint (path, size, mtime), so an edited file is re-read."""
    key = str(item.get("fingerprint", item["where"]))
    return hashlib.sha256(key.encode()).hexdigest().encode()  # MONAI decodes it as text


def make_loader(
    site: SiteDataset,
    items: list[dict[str, Any]],
    cfg: RunConfig,
    *,
    train: bool,
    device: torch.device,
    cache_dir: Path | None = None,
    workers: int | None = None,
    server_round: int = 0,
    extra: list[dict[str, Any]] | None = None,
    epoch_images: int | None = None,
) -> DataLoader:
    """A loader whose shuffling and augmentation are seeded by (seed, round).

    Each round's ClientApp builds a new loader; seeding it with the run seed
    alone would replay the same batches and the same augmentations every
    round, which measurably lets local models memorise their site.
    `extra` holds ready tensors (generated images) mixed into the epoch.
    `epoch_images`: an epoch of that many items drawn with replacement, whatever
    the site holds (a site whose counts are hidden trains a public number of steps).
    """
    transform = site_transforms(cfg, site.modality, train, site.array_channel_dim)
    seed = cfg.seed * 1_000_003 + server_round
    transform.set_random_state(seed=seed % 2**32)
    if cache_dir is not None and site.array_channel_dim is None:
        dataset = PersistentDataset(
            items,
            transform,
            cache_dir=transform_cache_dir(cache_dir, cfg, site, train),
            hash_func=_entry_hash,
        )
    else:
        dataset = CacheDataset(items, transform, cache_rate=1.0, progress=False)
    if extra:
        dataset = ConcatDataset([dataset, extra])
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if epoch_images is not None:
        sampler = RandomSampler(
            dataset, replacement=True, num_samples=epoch_images, generator=generator
        )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=loader_workers(device, workers),
        pin_memory=device.type == "cuda",
    )
