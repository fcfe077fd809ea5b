"""Shared fixtures: tiny configs and a small synthetic federation.

The tests run medfed as installed in .venv (from its wheel, as a hospital
installs it), so a session refuses to start when that copy differs from the
working tree: `make install` (or `make test`) reinstalls it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfed.server
from medfed.client.synthetic import generate_federation
from medfed.shared_models.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("server", "client", "shared_models")


def stale_modules(installed: Path) -> list[str]:
    """Source files of the working tree that the installed package lacks or holds otherwise."""
    stale = []
    for room in ROOMS:
        tree = {p.relative_to(ROOT): p for p in (ROOT / room).rglob("*.py")}
        copy = {p.relative_to(installed): p for p in (installed / room).rglob("*.py")}
        stale += [str(rel) for rel in sorted(tree.keys() ^ copy.keys())]
        stale += [
            str(r)
            for r in sorted(tree)
            if r in copy and tree[r].read_bytes() != copy[r].read_bytes()
        ]
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_modules(Path(medfed.server.__file__).resolve().parents[1])
    if stale:
        pytest.exit(
            f"the installed medfed differs from the working tree ({', '.join(stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''}): run `make install`",
            returncode=2,
        )


TINY = {"image-size": 32, "model-width": 4, "model-depth": 2, "batch-size": 8}


def tiny_config(**overrides: object) -> RunConfig:
    values = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return RunConfig.from_mapping(values)


BRAIN = {"0": "background", "1": "brain"}  # labels of sites that are not the default ones

# Run settings of a simulation whose small synthetic sites show their counts, and so
# their metrics (a site below the floor sends none): the tests that use it are about
# learning and processes, not disclosure.
SHOWN = ["-c", "stats-min-count=1"]


def relabelled_sites(seg_sites: Path, root: Path, labels_per_site: list[dict[str, str]]) -> Path:
    """Copies of the synthetic segmentation sites whose dataset.json declare other labels
    (masks folded onto as many values as the labels name)."""
    for index, labels in enumerate(labels_per_site):
        site = root / f"site-{index}"
        shutil.copytree(seg_sites / f"site-{index}", site)
        manifest = json.loads((site / "dataset.json").read_text())
        manifest["labels"] = labels
        (site / "dataset.json").write_text(json.dumps(manifest))
        for path in (site / "labelsTr").iterdir():
            mask = nib.load(path)
            folded = np.minimum(np.asarray(mask.dataobj), len(labels) - 1).astype(np.uint8)
            nib.save(nib.Nifti1Image(folded, mask.affine), path)
    return root


def redeclared_sites(sites: Path, root: Path, declared: list[dict[str, object]]) -> Path:
    """Copies of synthetic sites whose dataset.json declare other values (e.g. "task",
    "labels"); a value of None removes its key. The images are the synthetic ones."""
    for index, changes in enumerate(declared):
        site = root / f"site-{index}"
        shutil.copytree(sites / f"site-{index}", site)
        manifest = json.loads((site / "dataset.json").read_text())
        manifest.update(changes)
        manifest = {k: v for k, v in manifest.items() if v is not None}
        (site / "dataset.json").write_text(json.dumps(manifest))
    return root


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


@pytest.fixture
def supervised(monkeypatch: pytest.MonkeyPatch) -> list:
    """The services a `start` command would supervise, captured instead of started, in an
    environment that sets Flower's internal API switches (which no service may inherit)."""
    from medfed.shared_models import supervision

    launched: list[supervision.Service] = []

    def supervise(services: list[supervision.Service], *args: object, **kwargs: object) -> int:
        launched.extend(services)
        return 0

    monkeypatch.setattr(supervision, "supervise", supervise)
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    return launched
