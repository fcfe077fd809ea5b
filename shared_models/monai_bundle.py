"""A MONAI bundle as medfed federates it: its configs, their hash, its network, and the
keys a hospital overrides to point the bundle at its own data.

A bundle (https://docs.monai.io/en/stable/mb_specification.html) carries its whole
training recipe as config: `network_def`, loss, optimizer, transforms, trainer and,
optionally, a validation evaluator. medfed runs that recipe unchanged at every hospital
and replaces only where the data comes from (`site_overrides`), so the coordinator and
the hospitals agree on the network because all of them build the same `network_def`.

Bundle configs are code (`_target_` imports and calls, `$` expressions are evaluated):
every node must hold the same configs, which is why a bundle run carries their hash
(`sha256`) and a hospital whose copy differs refuses to run it. Reading a bundle here
only loads its JSON/YAML; nothing in it runs until a network or workflow is built.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from torch import nn

from medfed.shared_models.config import ConfigError

TRAIN_CONFIG = "configs/train.json"
EVALUATE_CONFIG = "configs/evaluate.json"  # merged over train.json for evaluation, as MonaiAlgo
# What the bundle hash covers: the configs, and the bundle's own Python code they may import.
HASHED_FOLDERS = ("configs", "scripts")
# Config ids (MONAI's bundle properties, monai/bundle/properties.py).
NETWORK = "network_def"
TRAINER = "train#trainer"
LOSS = "train#trainer#loss_function"
MAX_EPOCHS = "train#trainer#max_epochs"
EVALUATOR = "validate#evaluator"
BUNDLE_ROOT = "bundle_root"
DATASET_DIR = "dataset_dir"
DEVICE = "device"
TRAIN_DATA = "train#dataset#data"
VAL_DATA = "validate#dataset#data"
# Why each required id must be there (the error says so).
REQUIRED = {
    NETWORK: "the network the coordinator initialises and every hospital trains",
    TRAINER: "the SupervisedTrainer every hospital runs",
    LOSS: "the trainer's loss (also the validation loss medfed reports)",
    TRAIN_DATA: "the training data list: medfed sets it to each hospital's own datalist, "
    "so the bundle's train dataset must take a 'data' list",
}


class Bundle:
    """One bundle folder, its configs read (not run) and checked for the ids medfed needs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(
                f"config key 'bundle' = '{root}': not a folder (a MONAI bundle holding "
                f"{TRAIN_CONFIG})"
            )
        self.train_file = self.root / TRAIN_CONFIG
        if not self.train_file.is_file():
            raise ConfigError(
                f"{self.train_file}: missing (config key 'bundle': a MONAI bundle's training "
                "configuration)"
            )
        self.train_config = _read([self.train_file])
        for key, why in REQUIRED.items():
            if key not in self.train_config:
                raise ConfigError(f"{self.train_file}: no '{key}' ({why})")
        evaluate = self.root / EVALUATE_CONFIG
        # Relative to the bundle root, as MonaiAlgo takes them.
        self.eval_files = [TRAIN_CONFIG] + ([EVALUATE_CONFIG] if evaluate.is_file() else [])
        self.eval_config = _read([self.root / name for name in self.eval_files])
        self.has_evaluator = EVALUATOR in self.eval_config
        if self.has_evaluator and VAL_DATA not in self.eval_config:
            raise ConfigError(
                f"{self._eval_names()}: '{EVALUATOR}' but no '{VAL_DATA}' (medfed sets it to "
                "each hospital's validation datalist, so the validation dataset must take a "
                "'data' list)"
            )

    def _eval_names(self) -> str:
        return " + ".join(str(self.root / name) for name in self.eval_files)

    @cached_property
    def sha256(self) -> str:
        """A digest of every file under configs/ and scripts/: relative names and contents."""
        return bundle_sha256(self.root)

    def hashed_files(self) -> list[Path]:
        """The files the hash covers, in a fixed order."""
        return hashed_files(self.root)

    def copy_hashed(self, dest: Path) -> None:
        """The files the hash covers, copied to `dest` (replacing what is there): a run
        folder's own copy of its bundle, which a hospital can inspect, approve and rebuild
        the model from without following a path to the coordinator's disk. ConfigError
        when the copy does not hash as this bundle did (a file changed meanwhile)."""
        if dest.exists():
            shutil.rmtree(dest)
        for path in self.hashed_files():
            target = dest / path.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        if bundle_sha256(dest) != self.sha256:
            raise ConfigError(
                f"config key 'bundle' = '{self.root}': its configs changed while the run "
                f"copied them to {dest} (sha256 {self.sha256[:16]}… before)"
            )

    def identity(self) -> dict[str, Any]:
        """What a run records about its bundle (metrics.json, model.json, the audit log)."""
        return {
            "path": str(self.root),
            "sha256": self.sha256,
            "files": [p.relative_to(self.root).as_posix() for p in self.hashed_files()],
            "evaluator": self.has_evaluator,
        }

    def network(self) -> nn.Module:
        """A fresh instance of the bundle's `network_def` (on the CPU)."""
        parser = _read([self.train_file])
        parser[BUNDLE_ROOT] = str(self.root)
        try:
            net = parser.get_parsed_content(NETWORK)
        except Exception as err:  # the bundle's own code: any error, named by file and key
            raise ConfigError(f"{self.train_file}: '{NETWORK}' could not be built: {err}") from err
        if not isinstance(net, nn.Module):
            raise ConfigError(
                f"{self.train_file}: '{NETWORK}' is a {type(net).__name__}, not a torch network"
            )
        return net

    def loss(self) -> nn.Module:
        """The bundle's training loss (`train#trainer#loss_function`)."""
        parser = _read([self.train_file])
        try:
            return parser.get_parsed_content(LOSS)
        except Exception as err:
            raise ConfigError(f"{self.train_file}: '{LOSS}' could not be built: {err}") from err

    def site_overrides(
        self,
        site_root: Path,
        train: list[dict[str, Any]],
        val: list[dict[str, Any]],
        device: str,
        evaluation: bool,
    ) -> dict[str, Any]:
        """Config ids a hospital sets, for its training (or evaluation) workflow: the
        bundle's root and device, its dataset folder and its training and validation data
        lists, all pointed at this site; nothing else of the recipe changes."""
        config = self.eval_config if evaluation else self.train_config
        overrides: dict[str, Any] = {
            BUNDLE_ROOT: str(self.root),
            DATASET_DIR: str(site_root),
            DEVICE: f"$torch.device('{device}')",
            TRAIN_DATA: train,
        }
        if VAL_DATA in config:
            overrides[VAL_DATA] = val
        return overrides

    def check_hash(self, expected: str) -> None:
        """ConfigError unless this node's configs hash to what the coordinator holds."""
        if expected != self.sha256:
            raise ConfigError(
                f"config key 'bundle' = '{self.root}': this node's bundle configs hash to "
                f"{self.sha256[:16]}…, the coordinator's to {expected[:16]}…; every node must "
                f"hold the same {' and '.join(HASHED_FOLDERS)} files"
            )


def hashed_files(root: Path) -> list[Path]:
    """The files a bundle's hash covers (under configs/ and scripts/), in a fixed order."""
    files = [
        path
        for folder in HASHED_FOLDERS
        if (root / folder).is_dir()
        for path in (root / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def bundle_sha256(root: Path) -> str:
    """The bundle hash of the folder `root`: relative names and contents of its hashed
    files. Reads bytes only, so a bundle can be checked before any of its configs is
    read into objects (let alone run)."""
    digest = hashlib.sha256()
    for path in hashed_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read(files: list[Path]) -> ConfigParser:
    """The configs merged in order (read only: nothing in them runs)."""
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as err:  # malformed JSON/YAML
        names = " + ".join(str(f) for f in files)
        raise ConfigError(f"{names}: not a readable bundle config ({err})") from err
    return parser
