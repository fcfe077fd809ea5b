"""Which site folder this node trains on.

Deployment: the SuperNode's `--node-config "data-path=..."`. Simulation:
Flower's partition id, mapped onto the site folders under `data-root`
(or onto a cached synthetic federation when no data root is given, so that a
plain `flwr run .` works out of the box).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from medfed.client.data.manifest import (
    MANIFEST_CSV,
    MANIFEST_JSON,
    SiteDataError,
    find_manifest,
)
from medfed.client.settings import NodeSettings
from medfed.shared_models.config import RunConfig


def medfed_cache() -> Path:
    """Root of medfed's caches on this machine (MEDFED_CACHE, default ~/.cache/medfed)."""
    return Path(os.environ.get("MEDFED_CACHE", Path.home() / ".cache" / "medfed"))


def site_cache_dir(node: NodeSettings, site_path: Path) -> Path:
    """Where this node caches scans and preprocessed images (node config `cache-dir`).

    Outside the site folder by default: hospital data folders are often read-only.
    """
    if node.cache_dir is not None:
        return node.cache_dir
    key = hashlib.sha256(str(site_path.resolve()).encode()).hexdigest()[:16]
    return medfed_cache() / "sites" / f"{site_path.name}-{key}"


def site_folders(root: Path) -> list[Path]:
    """The site folders of a federation root, in natural order (site-2 < site-10).

    Every sub-folder is a hospital (hidden ones, such as `.cache`, aside): one
    that is empty or holds no manifest is an error naming it, never a site
    silently left out of the federation.
    """
    if not root.is_dir():
        raise SiteDataError(f"data root {root} does not exist or is not a folder")
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in found:
        find_manifest(folder)  # raises, naming the folder and what it lacks
    if not found:
        raise SiteDataError(
            f"data root {root} holds no site folders (one sub-folder per hospital, each "
            f"with a {MANIFEST_JSON}, {MANIFEST_CSV} or MedMNIST .npz)"
        )
    return sorted(
        found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    )


def resolve_site_path(node: NodeSettings, cfg: RunConfig) -> Path:
    """The site folder this node trains on (see the module docstring)."""
    if node.data_path is not None:
        return node.data_path
    if node.partition is None:
        raise SiteDataError(
            "node config has no 'data-path': start the node with "
            "--node-config \"data-path='/path/to/site'\""
        )
    partition, partitions = node.partition
    if cfg.data_root:
        sites = site_folders(Path(cfg.data_root).expanduser())
        if len(sites) < partitions:
            raise SiteDataError(
                f"data root {cfg.data_root} has {len(sites)} site folders "
                f"but the simulation has {partitions} nodes"
            )
        return sites[partition]
    from medfed.client.synthetic import generate_site  # MONAI: only for a synthetic site

    cache = medfed_cache() / "synthetic" / f"{cfg.task}-seed{cfg.seed}"
    return generate_site(cfg.task, partition, cache / f"site-{partition}", seed=cfg.seed)


def site_name(node: NodeSettings, path: Path) -> str:
    """A low-cardinality label for reports and metrics: never a patient or file name."""
    return node.site_name or path.name
