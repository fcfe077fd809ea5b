"""A trained network applied to one batch of studies, its output put back in each input's geometry.

Preprocessing is the training pipeline's own deterministic part
(`client.data.transforms.preprocessing`), so a study is seen exactly as the
federation saw its images. MONAI records every spatial step on the image
(MetaTensor.applied_operations); `Invertd` replays them backwards on the
network's output, so a mask comes back at the input's size, spacing and
orientation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd
from torch import nn

from medfed.client.data.image_headers import size_problem
from medfed.client.data.scan import unreadable
from medfed.client.data.transforms import preprocessing
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS


@dataclass
class Prediction:
    """One study's result: `output` is, for segmentation, the class probabilities
    (C, *input spatial shape) in the input's geometry; otherwise the network's output
    for the image (class probabilities, or the regressed value)."""

    case: dict[str, Any]
    image: torch.Tensor  # the preprocessed image (MetaTensor, network input size)
    output: torch.Tensor
    preview: torch.Tensor | None = None  # segmentation: the mask at the network's size


class Predictor:
    """The run's network with its preprocessing, for one modality."""

    def __init__(self, cfg: RunConfig, net: nn.Module, modality: str, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.task = TASKS[cfg.task]
        self.net = net.to(device).eval()
        self.transform = Compose(preprocessing(cfg, modality, ["image"]))
        roi = cfg.patch_size or cfg.image_size
        # Volumes trained on patches are read patch by patch, as MONAI's bundles do.
        self.inferer = SlidingWindowInferer(
            roi_size=(roi,) * self.task.spatial_dims, sw_batch_size=4, overlap=0.25
        )
        self.invert = Invertd(
            keys="output", transform=self.transform, orig_keys="image", nearest_interp=False
        )

    def predict(
        self, cases: Iterable[dict[str, Any]], batch_size: int, skipped: dict[str, str]
    ) -> Iterator[Prediction]:
        """Predictions, `batch_size` studies through the network at a time. A study that
        cannot be read or preprocessed is recorded in `skipped` (its input -> the reason)
        and the others go on."""
        ready: list[dict[str, Any]] = []
        for case in cases:
            problem = size_problem(case["image"], self.cfg.max_image_megabytes)
            if problem is None:  # a hostile header must not exhaust the node's memory
                try:
                    item = self.transform(case)
                    problem = self.unfit(item["image"])
                except Exception as err:  # any reader or transform failure: this study only
                    problem = reason(err, case["image"])
            if problem:
                skipped[case["input"]] = problem
                continue
            ready.append(item)
            if len(ready) == batch_size:
                yield from self.predict_batch(ready)
                ready = []
        if ready:
            yield from self.predict_batch(ready)

    def unfit(self, image: torch.Tensor) -> str | None:
        """Why a preprocessed study cannot go through the network (its channels), or None."""
        if image.shape[0] != self.cfg.in_channels:
            return (
                f"{image.shape[0]} channels after preprocessing; the model takes "
                f"{self.cfg.in_channels} (config key 'in-channels')"
            )
        return None

    def predict_batch(self, items: list[dict[str, Any]]) -> list[Prediction]:
        """Only the images are stacked: each study keeps its own metadata (readers of
        different formats record different keys, which MONAI's collate cannot merge)."""
        images = torch.stack([item["image"].as_tensor() for item in items]).to(self.device)
        with torch.no_grad():
            if self.task.label_kind == "mask":
                outputs = self.inferer(images, self.net).float().softmax(dim=1)
            else:
                outputs = self.net(images).float()
                if self.task.label_kind == "class":
                    outputs = outputs.softmax(dim=1)
        results = []
        for item, output in zip(items, outputs.cpu(), strict=True):
            item = {**item, "output": MetaTensor(output)}  # Invertd replays item["image"]'s steps
            preview = None
            if self.task.label_kind == "mask":
                preview = output.argmax(dim=0)
                item = self.invert(item)
            case = {k: v for k, v in item.items() if k not in ("image", "output")}
            results.append(Prediction(case, item["image"], item["output"], preview))
        return results


def reason(err: Exception, source: Any = None) -> str:
    """The first line of what went wrong, without MONAI's transform-chain preamble; for a
    study's `source` file, in `medfed data check`'s words ("corrupt or truncated NIfTI")."""
    while err.__cause__ is not None:
        err = err.__cause__  # MONAI wraps a reader's error in "applying transform ..."
    if source is not None:
        return unreadable(err, source)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
