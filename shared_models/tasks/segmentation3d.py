"""3D segmentation of multi-channel MRI (BraTS-like): 3D UNet or SegResNet.

Evaluation runs MONAI's sliding-window inference over the whole volume and
reports Dice and the 95th-percentile Hausdorff distance per tumour region.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.networks import spec
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, autocast
from medfed.shared_models.tasks.segmentation import SegmentationTask


class Segmentation3DTask(SegmentationTask):
    """3D segmentation of multi-channel MRI volumes (BraTS-like): the 2D task's loss and
    metrics on volumes, a 3D UNet or SegResNet, sliding-window evaluation."""

    description = DESCRIPTIONS["segmentation3d"]

    def network_spec(self, cfg: RunConfig) -> dict[str, Any]:
        if cfg.model == "segresnet":
            return spec(
                "SegResNet", spatial_dims=3, init_filters=cfg.model_width,
                in_channels=cfg.in_channels, out_channels=len(cfg.classes),
                blocks_down=[1, 2, 2, 4][: cfg.model_depth + 1], blocks_up=[1] * cfg.model_depth,
            )  # fmt: skip
        return super().network_spec(cfg)

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Dice and HD95 (voxels) per region over whole volumes, by sliding window.

        MONAI's HD95 is undefined when a mask is empty; here both-empty scores 0
        (nothing to find, nothing found) and exactly-one-empty scores the volume
        diagonal (the worst possible), so every site reports finite values.
        """
        num_classes = len(cfg.classes)
        roi = (cfg.patch_size or cfg.image_size,) * 3
        dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        loss_fn = self.build_loss(cfg)
        net.to(device).eval()
        total_loss, seen, distances = 0.0, 0, []
        with torch.no_grad():
            for batch in batches:
                images = batch["image"].to(device, non_blocking=True)
                labels = self.targets(batch, device)
                with autocast(cfg, device):
                    logits = sliding_window_inference(
                        images, roi, sw_batch_size=2, predictor=net, overlap=0.25
                    )
                logits = logits.float()
                total_loss += float(loss_fn(logits, labels)) * images.shape[0]
                seen += images.shape[0]
                predicted = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
                truth = one_hot(labels, num_classes)
                dice(predicted, truth)
                distances.append(_hd95(hd95, predicted, truth))
        if seen == 0:
            raise RuntimeError("no validation images: the site's validation split is empty")
        per_class = dice.aggregate().cpu()
        per_class_hd = torch.cat(distances).mean(dim=0)
        metrics = {
            "loss": total_loss / seen,
            "dice": float(per_class.mean()),
            "hd95": float(per_class_hd.mean()),
        }
        for i, name in enumerate(cfg.classes[1:]):
            metrics[f"dice-{name}"] = float(per_class[i])
            metrics[f"hd95-{name}"] = float(per_class_hd[i])
        return metrics


def _hd95(
    metric: HausdorffDistanceMetric, predicted: torch.Tensor, truth: torch.Tensor
) -> torch.Tensor:
    """Per (volume, region) HD95 with the empty-mask cases defined (see evaluate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        values = metric(predicted, truth).cpu().float()
    worst = math.sqrt(sum(s * s for s in truth.shape[2:]))
    spatial = tuple(range(2, truth.dim()))
    pred_any = predicted[:, 1:].sum(dim=spatial).cpu() > 0
    true_any = truth[:, 1:].sum(dim=spatial).cpu() > 0
    values = torch.where(~pred_any & ~true_any, torch.zeros_like(values), values)
    values = torch.where(pred_any ^ true_any, torch.full_like(values, worst), values)
    return torch.nan_to_num(values, nan=worst, posinf=worst)
