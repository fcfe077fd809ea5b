"""Image-level backbones shared by classification and regression (all MONAI, no downloads).

Each backbone names its head, the part `freeze = "backbone"` keeps training
and the part transfer learning re-initialises when the output size differs.
"""

from __future__ import annotations

from typing import Any

from monai.utils import instantiate
from torch import nn

from medfed.shared_models.config import RunConfig

HEADS = {
    "smallcnn": "final.",
    "densenet121": "class_layers.",
    "resnet18": "fc.",
    "resnet34": "fc.",
    "resnet50": "fc.",
    "efficientnet-b0": "_fc.",
}
RESNETS = ("resnet18", "resnet34", "resnet50")


def build_backbone(cfg: RunConfig, outputs: int) -> nn.Module:
    """The network `cfg.model` with `outputs` linear outputs (logits or regression values)."""
    return build(backbone_spec(cfg, outputs))


def backbone_spec(cfg: RunConfig, outputs: int) -> dict[str, Any]:
    """`build_backbone`'s network as a MONAI bundle config item (`_target_` and arguments):
    the one description both medfed and an exported bundle build the network from."""
    name = cfg.model
    if name == "densenet121":
        return spec("DenseNet121", spatial_dims=2, in_channels=cfg.in_channels,
                    out_channels=outputs)  # fmt: skip
    if name in RESNETS:
        return spec(name, spatial_dims=2, n_input_channels=cfg.in_channels,
                    num_classes=outputs, pretrained=False)  # fmt: skip
    if name == "efficientnet-b0":
        return spec("EfficientNetBN", model_name="efficientnet-b0", pretrained=False,
                    spatial_dims=2, in_channels=cfg.in_channels, num_classes=outputs)  # fmt: skip
    # "smallcnn": MONAI's Classifier, a residual conv stack that trains on a CPU.
    return spec(
        "Classifier",
        in_shape=[cfg.in_channels, cfg.image_size, cfg.image_size],
        classes=outputs,
        channels=[cfg.model_width * 2**i for i in range(cfg.model_depth)],
        strides=[2] * cfg.model_depth,
        num_res_units=1,
        norm=cfg.norm,
    )


def spec(network: str, **arguments: Any) -> dict[str, Any]:
    """A config item for one of MONAI's networks (monai.networks.nets)."""
    return {"_target_": f"monai.networks.nets.{network}", **arguments}


def build(item: dict[str, Any]) -> nn.Module:
    """The network a config item describes (what `monai.bundle` does with it)."""
    arguments = {k: v for k, v in item.items() if k != "_target_"}
    return instantiate(item["_target_"], "default", **arguments)


def head_prefix(model: str) -> str:
    return HEADS[model]
