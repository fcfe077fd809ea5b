"""DataLoaders over a site's splits."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import CacheDataset, DataLoader

from medfed.client.transforms import site_transforms
from medfed.shared_models.config import RunConfig


def make_loader(
    items: list[dict[str, Any]], cfg: RunConfig, train: bool, device: torch.device
) -> DataLoader:
    """Cache decoded, resized images in memory; shuffle (seeded) only for training."""
    dataset = CacheDataset(items, site_transforms(cfg, train), cache_rate=1.0, progress=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        generator=generator,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
