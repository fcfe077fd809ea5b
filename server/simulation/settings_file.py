"""Run settings from a file, for `medfed simulate`: the app's pyproject.toml or a TOML of keys.

The README says a run's settings live in `[tool.flwr.app.config]` of
pyproject.toml; `medfed simulate` runs the installed medfed, whose wheel has
no pyproject.toml, so without this an edit of the checkout's file changed
nothing, silently. A key whose value equals the built-in default is a
default, not a choice (the checkout's table lists every key): `--data` still
takes the task its sites declare unless the file sets another.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from medfed.shared_models.config import ConfigError, RunConfig

PYPROJECT = Path("pyproject.toml")
APP_TABLE = "[tool.flwr.app.config]"
SERVER_APP = "medfed.server.app:app"


def default_settings_file(folder: Path) -> Path | None:
    """`folder`'s pyproject.toml when it is medfed's app (its ServerApp is medfed's)."""
    path = folder / PYPROJECT
    if not path.is_file():
        return None
    try:
        flwr = tomllib.loads(path.read_text()).get("tool", {}).get("flwr", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None  # someone else's project: not ours to read or to refuse
    return (
        path if flwr.get("app", {}).get("components", {}).get("serverapp") == SERVER_APP else None
    )


def file_settings(path: Path) -> dict[str, Any]:
    """The run-config keys `path` sets to something other than their default; ConfigError
    naming the file and the key for an unreadable file or an unknown key."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: {error}") from error
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    where = f"{path} {APP_TABLE}" if table is not None else str(path)
    values = flatten_dict(table if table is not None else document)
    defaults = RunConfig().to_mapping()
    for key in values:
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f": did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
    return {key: value for key, value in values.items() if value != defaults[key]}
