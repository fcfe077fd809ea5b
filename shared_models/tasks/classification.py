"""Image classification (COVID-19 / pneumonia X-ray, brain-tumour MRI)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, ROCAUCMetric
from monai.networks.utils import one_hot
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.networks import backbone_spec, head_prefix
from medfed.shared_models.task_descriptions import DESCRIPTIONS
from medfed.shared_models.tasks.base import Batch, Task, autocast


class ClassificationTask(Task):
    """Image classification (chest X-ray: normal / pneumonia / COVID-19, brain-tumour MRI):
    a backbone with one logit per class, cross-entropy, macro AUC and per-class metrics."""

    description = DESCRIPTIONS["classification"]

    def network_spec(self, cfg: RunConfig) -> dict[str, Any]:
        return backbone_spec(cfg, outputs=len(cfg.classes))

    def head(self, cfg: RunConfig) -> str:
        return head_prefix(cfg.model)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return nn.CrossEntropyLoss()

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch["label"].to(device, non_blocking=True).long().view(-1)

    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, accuracy, macro AUC and per-class precision / recall."""
        num_classes = len(cfg.classes)
        loss_fn = self.build_loss(cfg)
        net.to(device).eval()
        all_logits, all_labels = [], []
        with torch.no_grad():
            for batch in batches:
                images = batch["image"].to(device, non_blocking=True)
                with autocast(cfg, device):
                    logits = net(images)
                all_logits.append(logits.float().cpu())
                all_labels.append(self.targets(batch, torch.device("cpu")))
        if not all_logits:
            raise RuntimeError("no validation images: the site's validation split is empty")
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        labels_1h = one_hot(labels[:, None], num_classes)
        preds_1h = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)

        confusion = ConfusionMatrixMetric(
            include_background=True,
            metric_name=["precision", "recall"],
            compute_sample=False,
            reduction="sum_batch",
        )
        confusion(preds_1h, labels_1h)
        precision, recall = (np.nan_to_num(t.numpy(), nan=0.0) for t in confusion.aggregate())

        metrics = {
            "loss": float(loss_fn(logits, labels)),
            "accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
            "auc": macro_auc(logits.softmax(dim=1), labels_1h),
        }
        for i, name in enumerate(cfg.classes):
            metrics[f"precision-{name}"] = float(precision[i])
            metrics[f"recall-{name}"] = float(recall[i])
        return metrics


def macro_auc(probabilities: torch.Tensor, labels_1h: torch.Tensor) -> float:
    """Mean one-vs-rest AUC over the classes present at this site.

    A class with no positive (or no negative) example has no AUC; a hospital's
    small validation split often lacks a rare class, so those are left out
    rather than making the whole metric NaN. With no scorable class the score
    is 0.5, chance level.
    """
    present = labels_1h.sum(dim=0)
    scorable = (present > 0) & (present < labels_1h.shape[0])
    if not scorable.any():
        return 0.5
    metric = ROCAUCMetric(average="macro")
    metric(probabilities[:, scorable], labels_1h[:, scorable])
    return float(metric.aggregate())
