"""MONAI preprocessing: load, conform, orient, resample, normalise by modality, fit, augment.

Everything up to the augmentation is deterministic and therefore cacheable
(PersistentDataset); augmentation is applied to training batches only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandGaussianNoised,
    RandSpatialCropd,
    SelectItemsd,
)
from monai.utils import instantiate

from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

# ITK-free readers, tried in this order by file suffix.
READERS = ["NibabelReader", "PydicomReader", "PILReader", "NumpyReader"]

# LoadImage always instantiates MONAI's optional GPU DICOM decoder too, which
# logs and warns on every construction when nvImageCodec/CuPy are absent (the
# normal case on a CPU node). pydicom's own decoders are used either way.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

# Orientationd's axis labels, given explicitly: MONAI 1.6 warns that its default will
# follow the image's own space; medfed's images are always RAS-labelled.
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]

# The one transform of the pipeline that is medfed's own (an exported bundle carries its
# source, see client.export).
CONFORM = "medfed.client.data.transforms.ConformSpatiald"

# Per-modality intensity defaults: CT has absolute units (HU) worth keeping as
# a window. MR and radiographs have arbitrary, scanner-dependent units, so they
# are scaled by robust percentiles (min-max scaling, "scale", lets one hot
# pixel set the range: measured worse on the synthetic X-rays).
INTENSITY_BY_MODALITY = {"CT": "ct-window"}


def resolve_modality(cfg: RunConfig, declared: str | None) -> str:
    """The run's modality setting, else the site's declared one, else the task's usual one,
    as a DICOM code (upper case: `ct` is CT, and gets CT's window)."""
    if cfg.modality != "auto":
        return cfg.modality.upper()
    return (declared or TASKS[cfg.task].default_modality).upper()


def intensity_mode(cfg: RunConfig, modality: str) -> str:
    """The intensity normalisation: the run's setting, else the modality's default."""
    if cfg.intensity != "auto":
        return cfg.intensity
    return INTENSITY_BY_MODALITY.get(modality, "percentile")


class ConformSpatiald(MapTransform):
    """Drop extra singleton axes (a 2D slice saved as HxWx1), make images float, RGB grey.

    Hand-written: MONAI has no transform that reconciles a site's stored layout
    with the network's spatial rank and channel count in one step.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, in_channels: int) -> None:
        super().__init__(keys)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            while value.dim() - 1 > self.spatial_dims:
                singles = [d for d in range(1, value.dim()) if value.shape[d] == 1]
                if not singles:
                    break
                value = value.squeeze(singles[-1])
            if key == "image":  # stored as uint8/int16/...; normalisation needs floats
                value = value.float()
                if self.in_channels == 1 and value.shape[0] in (3, 4):
                    value = value[:3].mean(dim=0, keepdim=True)
            out[key] = value
        return out


def site_transforms(
    cfg: RunConfig, modality: str, train: bool, array_channel_dim: str | int | None = None
) -> Compose:
    """The full pipeline; `array_channel_dim` is set for in-memory (.npz) images."""
    task = TASKS[cfg.task]
    masks = task.label_kind == "mask"
    keys = ["image", "label"] if masks else ["image"]
    steps = preprocessing(cfg, modality, keys, array_channel_dim)
    if train and cfg.patch_size and cfg.patch_size < cfg.image_size:
        steps.append(
            RandSpatialCropd(
                keys=keys, roi_size=(cfg.patch_size,) * task.spatial_dims, random_size=False
            )
        )
    if train:
        steps += [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(task.spatial_dims)
        ]
        if not masks:
            steps.append(RandGaussianNoised(keys="image", prob=0.3, std=0.02))
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    # Batches carry tensors only: no file names travel further, and generated
    # images (GAN augmentation) collate with real ones.
    steps.append(SelectItemsd(keys=["image", "label"]))
    return Compose(steps)


def preprocessing(
    cfg: RunConfig, modality: str, keys: list[str], array_channel_dim: str | int | None = None
) -> list[MapTransform]:
    """The deterministic steps, from a file to the network's input size: what training,
    evaluation and `medfed predict` share (spatial steps are invertible, so a prediction
    can be put back in the input's own geometry)."""
    items = preprocessing_spec(cfg, modality, keys, from_files=array_channel_dim is None)
    if array_channel_dim is not None:  # in-memory (.npz) images: no reader, no orientation
        items[:2] = [
            item("EnsureTyped", keys="image", data_type="tensor"),
            item("EnsureChannelFirstd", keys="image", channel_dim=array_channel_dim),
        ]
    return [instantiate(entry.pop("_target_"), "default", **entry) for entry in items]


def preprocessing_spec(
    cfg: RunConfig, modality: str, keys: list[str], from_files: bool = True
) -> list[dict[str, Any]]:
    """`preprocessing` as MONAI bundle config items (`_target_` and arguments): the one
    description medfed builds its pipeline from and an exported bundle writes out."""
    task = TASKS[cfg.task]
    modes = ["bilinear", "nearest"][: len(keys)]
    size = [cfg.image_size] * task.spatial_dims
    items = [
        item("LoadImaged", keys=keys, reader=READERS, image_only=True),
        item("EnsureChannelFirstd", keys=keys),
        {"_target_": CONFORM, "keys": keys, "spatial_dims": task.spatial_dims,
         "in_channels": cfg.in_channels},
    ]  # fmt: skip
    if task.spatial_dims == 3 and from_files:
        items.append(item("Orientationd", keys=keys, axcodes="RAS", labels=RAS_LABELS))
    if cfg.spacing:
        items.append(item("Spacingd", keys=keys, pixdim=list(cfg.pixel_spacing), mode=modes))
    items.append(_intensity(cfg, modality))
    if cfg.fit == "pad-crop":
        items.append(item("ResizeWithPadOrCropd", keys=keys, spatial_size=size))
    else:
        items.append(item("Resized", keys=keys, spatial_size=size, mode=modes))
    return items


def item(transform: str, **arguments: Any) -> dict[str, Any]:
    """A config item for one of MONAI's transforms (monai.transforms)."""
    return {"_target_": f"monai.transforms.{transform}", **arguments}


def _intensity(cfg: RunConfig, modality: str) -> dict[str, Any]:
    mode = intensity_mode(cfg, modality)
    if mode == "ct-window":
        low, high = cfg.ct_window_range
        return item("ScaleIntensityRanged", keys="image", a_min=low, a_max=high, b_min=0.0,
                    b_max=1.0, clip=True)  # fmt: skip
    if mode == "percentile":
        return item("ScaleIntensityRangePercentilesd", keys="image", lower=0.5, upper=99.5,
                    b_min=0.0, b_max=1.0, clip=True, channel_wise=True)  # fmt: skip
    if mode == "zscore":
        return item("NormalizeIntensityd", keys="image", nonzero=True, channel_wise=True)
    if mode == "scale":
        return item("ScaleIntensityd", keys="image", minv=0.0, maxv=1.0)
    return item("EnsureTyped", keys="image")  # "none": the site's values as stored
