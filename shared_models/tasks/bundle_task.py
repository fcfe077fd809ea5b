"""Any MONAI bundle, federated: the network is the bundle's `network_def`, the recipe its own.

What the coordinator needs of a task, a bundle provides: the network to initialise
(and to check resumed checkpoints against) and the metric keys of the round loop.
Training and evaluation do not go through `Task.train` / `Task.evaluate`: a bundle
brings its own data pipeline, trainer and evaluator, which the hospital runs through
MONAI's `MonaiAlgo` (client/bundle_handlers.py) on the site's own datalist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, Task


class BundleTask(Task):
    """A MONAI bundle's own training configuration, run at every hospital."""

    description = DESCRIPTIONS["bundle"]

    def build_network(self, cfg: RunConfig) -> nn.Module:
        return Bundle(cfg.bundle).network()

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return Bundle(cfg.bundle).loss()

    def label_bins(self, cfg: RunConfig) -> list[str]:
        """None: medfed does not know a bundle's labels, so sites send no label histogram."""
        return []

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        raise TypeError(
            "a bundle is evaluated by its own evaluator at the hospital "
            "(client/bundle_handlers.py), not on medfed's batches"
        )

    def train(
        self,
        net: nn.Module,
        batches: Iterable[Batch],
        cfg: RunConfig,
        device: torch.device,
        proximal_mu: float = 0.0,
        on_batch: Callable[[], None] | None = None,
    ) -> float:
        raise TypeError(
            "a bundle is trained by its own trainer at the hospital "
            "(client/bundle_handlers.py), not on medfed's batches"
        )
