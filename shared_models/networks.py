"""Image-level backbones shared by classification and regression (all MONAI, no downloads).

Each backbone names its head, the part `freeze = "backbone"` keeps training
and the part transfer learning re-initialises when the output size differs.
"""

from __future__ import annotations

from monai.networks.nets import (
    Classifier,
    DenseNet121,
    EfficientNetBN,
    resnet18,
    resnet34,
    resnet50,
)
from torch import nn

from medfed.shared_models.config import RunConfig

BACKBONES = ("smallcnn", "densenet121", "resnet18", "resnet34", "resnet50", "efficientnet-b0")
HEADS = {
    "smallcnn": "final.",
    "densenet121": "class_layers.",
    "resnet18": "fc.",
    "resnet34": "fc.",
    "resnet50": "fc.",
    "efficientnet-b0": "_fc.",
}
_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def build_backbone(cfg: RunConfig, outputs: int) -> nn.Module:
    """The network `cfg.model` with `outputs` linear outputs (logits or regression values)."""
    name = cfg.model
    if name == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=cfg.in_channels, out_channels=outputs)
    if name in _RESNETS:
        return _RESNETS[name](
            spatial_dims=2, n_input_channels=cfg.in_channels, num_classes=outputs, pretrained=False
        )
    if name == "efficientnet-b0":
        return EfficientNetBN(
            "efficientnet-b0",
            pretrained=False,
            spatial_dims=2,
            in_channels=cfg.in_channels,
            num_classes=outputs,
        )
    # "smallcnn": MONAI's Classifier, a residual conv stack that trains on a CPU.
    channels = tuple(cfg.model_width * 2**i for i in range(cfg.model_depth))
    return Classifier(
        in_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        classes=outputs,
        channels=channels,
        strides=(2,) * cfg.model_depth,
        num_res_units=1,
        norm=cfg.norm,
    )


def head_prefix(model: str) -> str:
    return HEADS[model]
