"""Image regression (children's bone age from hand X-rays): a CNN regressor, MAE in months."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.networks import backbone_spec, head_prefix
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, Task, autocast


class ScaledL1(nn.Module):
    """Smooth-L1 on targets divided by `scale`: months in, unit-sized gradients inside."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.loss = nn.SmoothL1Loss()

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of predictions against targets, both in the scaled unit."""
        return self.loss(prediction.view(-1) / self.scale, target.view(-1) / self.scale)


class RegressionTask(Task):
    """One value per image (bone age in months on hand X-rays): a backbone with one
    output, a scaled smooth-L1 loss, MAE and RMSE."""

    description = DESCRIPTIONS["regression"]

    def label_bins(self, cfg: RunConfig) -> list[str]:
        width = cfg.target_scale / 2
        return [f"{i * width:g}-{(i + 1) * width:g}" for i in range(4)] + [f">{4 * width:g}"]

    def label_bin(self, label: float, cfg: RunConfig) -> int:
        return min(4, max(0, int(label // (cfg.target_scale / 2))))

    def network_spec(self, cfg: RunConfig) -> dict[str, Any]:
        return backbone_spec(cfg, outputs=1)

    def head(self, cfg: RunConfig) -> str:
        return head_prefix(cfg.model)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return ScaledL1(cfg.target_scale)

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True).float().view(-1)

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, mean absolute error and root mean squared error, in the label's units."""
        loss_fn = self.build_loss(cfg)
        net.to(device).eval()
        predictions, targets = [], []
        with torch.no_grad():
            for batch in batches:
                with autocast(cfg, device):
                    out = net(batch["image"].to(device, non_blocking=True))
                predictions.append(out.float().view(-1).cpu())
                targets.append(self.targets(batch, torch.device("cpu")))
        if not predictions:
            raise RuntimeError("no validation images: the site's validation split is empty")
        p, t = torch.cat(predictions), torch.cat(targets)
        return {
            "loss": float(loss_fn(p, t)),
            "mae": float((p - t).abs().mean()),
            "rmse": float((p - t).pow(2).mean().sqrt()),
        }
