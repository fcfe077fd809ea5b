"""Shared fixtures: tiny configs and a small synthetic federation."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.synthetic import generate_federation
from medfed.shared_models.config import RunConfig

TINY = {"image-size": 32, "model-width": 4, "model-depth": 2, "batch-size": 8}


def tiny_config(**overrides: object) -> RunConfig:
    values = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return RunConfig.from_mapping(values)


@pytest.fixture(scope="session")
def seg_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    generate_federation("segmentation", 3, root, seed=1, images_per_site=20, image_size=32)
    return root


@pytest.fixture(scope="session")
def cls_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cls")
    generate_federation("classification", 3, root, seed=1, images_per_site=30, image_size=32)
    return root
