"""2D segmentation (brain tumour, breast, heart): MONAI UNet, DiceCE loss, Dice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.networks import spec
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, Task, autocast


def unet_spec(cfg: RunConfig, spatial_dims: int) -> dict[str, Any]:
    """MONAI's residual UNet, `model-depth` levels from `model-width` channels (2D or 3D),
    as a MONAI bundle config item (what Task.build_network builds)."""
    return spec(
        "UNet",
        spatial_dims=spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=len(cfg.classes),
        channels=[cfg.model_width * 2**i for i in range(cfg.model_depth + 1)],
        strides=[2] * cfg.model_depth,
        num_res_units=1,
        norm=cfg.norm,
    )


class SegmentationTask(Task):
    """2D segmentation (brain tumour, breast, heart): MONAI UNet, Dice + cross-entropy,
    mean and per-class Dice."""

    description = DESCRIPTIONS["segmentation"]

    def network_spec(self, cfg: RunConfig) -> dict[str, Any]:
        return unet_spec(cfg, spatial_dims=self.spatial_dims)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True).long()

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Mean Dice over the foreground classes, Dice per class, and the loss.

        `ignore_empty=False` scores an empty prediction on an empty mask as 1
        (and any false positive there as 0), so slices without a lesion count
        instead of turning a site's metric into NaN.
        """
        num_classes = len(cfg.classes)
        dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
        loss_fn = self.build_loss(cfg)
        net.to(device).eval()
        total_loss, seen = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                images = batch["image"].to(device, non_blocking=True)
                labels = self.targets(batch, device)
                with autocast(cfg, device):
                    logits = net(images)
                logits = logits.float()
                total_loss += float(loss_fn(logits, labels)) * images.shape[0]
                seen += images.shape[0]
                predicted = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
                dice(predicted, one_hot(labels, num_classes))
        if seen == 0:
            raise RuntimeError("no validation images: the site's validation split is empty")
        per_class = dice.aggregate().cpu()
        metrics = {"loss": total_loss / seen, "dice": float(per_class.mean())}
        for name, value in zip(cfg.classes[1:], per_class.tolist(), strict=True):
            metrics[f"dice-{name}"] = float(value)
        return metrics
