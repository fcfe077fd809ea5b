"""Run folders a run config names at a hospital (`gan-model`, `gan-feature-model`).

The run config is the operator's; the paths in it are opened by every node. On a
deployed node (started by `medfed node start`) such a setting is only a name: the
folder of that name under the node's `models/` folder (in its state folder), where
the hospital put the run folders it was handed. An absolute path or one that leaves
that folder is refused before anything is opened, so the run config cannot make a
node open, or test for, files of its own choosing. A simulation runs on the
researcher's own machine and takes the paths as they are.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath

from medfed.client.approval import STATE_ENV
from medfed.shared_models.config import ConfigError, RunConfig

MODELS_DIR = "models"
KEYS = ("gan_model", "gan_feature_model")


def node_models_dir() -> Path | None:
    """The models folder of a deployed node (None in a simulation)."""
    state = os.environ.get(STATE_ENV)
    return Path(state) / MODELS_DIR if state else None


def resolve(cfg: RunConfig) -> RunConfig:
    """`cfg` with the run folders it names resolved for this node (see the module)."""
    folder = node_models_dir()
    if folder is None:
        return cfg
    resolved = {}
    for attr in KEYS:
        value = getattr(cfg, attr)
        if not value:
            continue
        name = PurePosixPath(value)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ConfigError(
                f"config key '{attr.replace('_', '-')}' = {value!r}: on a hospital's node, "
                f"the name of a run folder the hospital put under its node state's "
                f"'{MODELS_DIR}/' folder (no absolute path, no '..')"
            )
        resolved[attr] = str(folder / name)
    return dataclasses.replace(cfg, **resolved)
