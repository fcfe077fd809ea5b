"""Training without a federation: one hospital alone, or every site's data pooled in one loop.

These are the two baselines a consortium weighs a federation against (FLamby
reports both per dataset): what each hospital reaches on its own data, and
what one model trained on everyone's data would reach if the images could be
pooled. They use the hospital's own data path (site scan, MONAI transforms,
`Task.train`, `Task.evaluate`), so the only difference from a federated run
is the federation itself.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from torch.utils.data import ConcatDataset

from medfed.client.data.loader import make_loader
from medfed.client.data.site import SiteDataset, load_site
from medfed.client.handlers import pick_device
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

SiteMetrics = dict[str, dict[str, float]]  # site name -> its validation metrics


def train_and_evaluate(
    train_on: list[Path], evaluate_on: list[Path], cfg: RunConfig, epochs: int
) -> SiteMetrics:
    """Train one network on the training splits of `train_on` (pooled, shuffled together)
    for `epochs` epochs, then score it on the validation split of every `evaluate_on` site.

    The network starts from the weights a federated run of `cfg` starts from (the
    coordinator seeds torch with `seed` before building it), and one optimiser runs
    through all epochs, as a hospital training alone would.
    """
    device = pick_device(cfg.device)
    sites = {path: load_site(path, cfg) for path in dict.fromkeys([*train_on, *evaluate_on])}
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task]
    net = task.build_network(cfg)
    pooled = ConcatDataset([_loader(sites[p], cfg, device, train=True).dataset for p in train_on])
    batches = DataLoader(
        pooled,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=0,
    )
    task.train(net, batches, replace(cfg, local_epochs=epochs), device)
    return {
        sites[p].name: task.evaluate(net, _loader(sites[p], cfg, device, train=False), cfg, device)
        for p in evaluate_on
    }


def _loader(site: SiteDataset, cfg: RunConfig, device: torch.device, train: bool) -> DataLoader:
    items = site.train if train else site.val
    return make_loader(site, items, cfg, train=train, device=device, workers=0)
