"""A small MONAI bundle written by the tests: 2D segmentation of the synthetic brain sites.

It is laid out as a MONAI model-zoo bundle is (configs/train.json with network_def,
loss, optimizer, train and validate sections), so what medfed overrides per site is
visible: the bundle's own `dataset_dir` is a folder no site has, and its data lists
glob that folder; a run must point both at each hospital's own dataset.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLASSES = 3  # background, edema, tumour (client/synthetic/brain_mri.py)
SIZE = 32


def _transforms(keys: list[str]) -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": keys, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {
                "_target_": "Resized",
                "keys": keys,
                "spatial_size": [SIZE, SIZE],
                "mode": ["bilinear", "nearest"],
            },
            {"_target_": "EnsureTyped", "keys": keys},
        ],
    }


def _glob(split: str) -> str:
    """The bundle's own data list: every case under its dataset_dir (never a site's)."""
    pairs = (
        "zip(sorted(glob.glob(@dataset_dir + '/imagesTr/*.nii.gz')), "
        "sorted(glob.glob(@dataset_dir + '/labelsTr/*.nii.gz')))"
    )
    part = "[:-2]" if split == "train" else "[-2:]"
    return f"$[{{'image': i, 'label': l}} for i, l in {pairs}]{part}"


def _section(split: str, shuffle: bool) -> dict[str, Any]:
    return {
        "preprocessing": _transforms(["image", "label"]),
        "dataset": {
            "_target_": "Dataset",
            "data": _glob(split),
            "transform": f"@{split}#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": f"@{split}#dataset",
            "batch_size": 2,
            "shuffle": shuffle,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
    }


def train_config(lr: float) -> dict[str, Any]:
    """configs/train.json: a tiny UNet trained with Dice + cross-entropy and Adam."""
    train = _section("train", shuffle=True)
    train["trainer"] = {
        "_target_": "SupervisedTrainer",
        "max_epochs": 100,  # the bundle's standalone setting; medfed sets local-epochs
        "device": "@device",
        "train_data_loader": "@train#dataloader",
        "network": "@network",
        "loss_function": "@loss",
        "optimizer": "@optimizer",
        "inferer": "@train#inferer",
    }
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "dataset_dir": "/nonexistent/bundle-data",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": CLASSES,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
        },
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": lr},
        "train": train,
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }


def validate_section() -> dict[str, Any]:
    """The validation section: argmax one-hot predictions scored by mean foreground Dice."""
    validate = _section("validate", shuffle=False)
    one_hot = {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False]}
    one_hot["to_onehot"] = CLASSES
    validate["postprocessing"] = {"_target_": "Compose", "transforms": [one_hot]}
    validate["key_metric"] = {
        "val_mean_dice": {
            "_target_": "MeanDice",
            "include_background": False,
            "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
        }
    }
    validate["evaluator"] = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@validate#dataloader",
        "network": "@network",
        "inferer": "@validate#inferer",
        "postprocessing": "@validate#postprocessing",
        "key_val_metric": "@validate#key_metric",
    }
    return validate


def write_bundle(root: Path, lr: float = 0.01, evaluator: bool = True, **changes: Any) -> Path:
    """The bundle folder at `root`; `changes` replace (or, as None, drop) top-level keys."""
    config = train_config(lr)
    if evaluator:
        config["validate"] = validate_section()
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "train.json").write_text(json.dumps(config, indent=2))
    metadata = {"version": "0.1.0", "name": "medfed test segmentation bundle"}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return root
