"""MONAI preprocessing per task: the deterministic part is cached, augmentation is train-only."""

from __future__ import annotations

import logging
import warnings

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandGaussianNoised,
    Resized,
    ScaleIntensityRangePercentilesd,
)

from medfed.shared_models.config import RunConfig

# ITK-free readers, tried in this order by file suffix.
READERS = ["NibabelReader", "PydicomReader", "PILReader", "NumpyReader"]

# LoadImage always instantiates MONAI's optional GPU DICOM decoder too, which
# logs and warns on every construction when nvImageCodec/CuPy are absent (the
# normal case on a CPU node). pydicom's own decoders are used either way.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def site_transforms(cfg: RunConfig, train: bool) -> Compose:
    """Load, channel-first, normalise per image (removes scanner scale), resize, augment."""
    size = (cfg.image_size, cfg.image_size)
    if cfg.task == "segmentation":
        keys = ["image", "label"]
        steps = [
            LoadImaged(keys=keys, reader=READERS, image_only=True),
            EnsureChannelFirstd(keys=keys),
            NormalizeIntensityd(keys="image", nonzero=True),
            Resized(keys=keys, spatial_size=size, mode=("bilinear", "nearest")),
        ]
        augment = [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        ]
    else:
        keys = ["image"]
        steps = [
            LoadImaged(keys=keys, reader=READERS, image_only=True),
            EnsureChannelFirstd(keys=keys),
            ScaleIntensityRangePercentilesd(
                keys=keys, lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True
            ),
            Resized(keys=keys, spatial_size=size, mode="bilinear"),
        ]
        augment = [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandGaussianNoised(keys=keys, prob=0.3, std=0.02),
        ]
    steps += augment if train else []
    steps.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(steps)
