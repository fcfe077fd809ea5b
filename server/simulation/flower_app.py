"""The Flower app that `flwr run` starts for `medfed simulate`.

`flwr run DIR` packs DIR into a Flower app bundle whose pyproject.toml names
the ServerApp and ClientApp and carries the run-config defaults. medfed is
installed as a package (a wheel has no pyproject.toml), so it writes those
tables into a folder of its own; the apps themselves are imported from the
installed package. The defaults are RunConfig's, which a test keeps equal to
the repository's pyproject.toml (what `flwr run .` from a checkout uses).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import tomli_w

from medfed.shared_models.config import RunConfig

COMPONENTS = {"serverapp": "medfed.server.app:app", "clientapp": "medfed.client.app:app"}


def app_pyproject() -> dict[str, Any]:
    """The pyproject tables Flower needs to run medfed: project, publisher, apps, defaults."""
    config: dict[str, Any] = {}
    for key, value in RunConfig().to_mapping().items():
        table, _, name = key.rpartition(".")
        (config.setdefault(table, {}) if table else config)[name] = value
    try:
        release = version("medfed")
    except PackageNotFoundError:
        release = "0.0.0"
    return {
        "project": {
            "name": "medfed",
            "version": release,
            "description": "Federated learning for medical imaging across hospitals",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {"app": {"publisher": "medfed", "components": COMPONENTS, "config": config}}
        },
    }


def app_dir(folder: Path) -> Path:
    """`folder`, holding the app's pyproject.toml (written now)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject()))
    return folder
