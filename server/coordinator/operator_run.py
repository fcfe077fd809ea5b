"""`medfed operator run`: `flwr run` for a consortium run, with its config checked first
and an exit code that tells how the run ended.

`flwr run . consortium --run-config "local-epoch=1"` answers only "[code: 15]
Invalid run configuration" (Flower's SuperLink refuses a key the app does
not define, without naming it), a value medfed refuses (`num-server-rounds=-1`)
streams a ServerApp traceback, and `flwr run --stream` exits 0 whatever the
run did. Here the overrides are read as Flower reads them, each key checked
against the app's own config table (naming the closest key) and the whole
config against medfed's rules, before anything is sent; then the run is
started, its log followed, and the exit code is 0 only for a completed run.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict, fuse_dicts, get_project_config, parse_config_args

from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.supervision import executable


@dataclass(frozen=True)
class RunOptions:
    """What `medfed operator run` was asked to start."""

    app: Path  # the app folder the hospitals approved the package of
    connection: str = "consortium"  # the Flower connection `medfed operator connect` made
    run_config: str = ""  # Flower's `--run-config` text: "key=value key=value"


def checked_config(app: Path, overrides_text: str) -> dict[str, Any]:
    """The run's whole config as the coordinator will receive it; ConfigError naming the
    first unknown key (and the closest known one) or the first bad value."""
    try:
        defaults = flatten_dict(get_project_config(app)["tool"]["flwr"]["app"].get("config", {}))
        overrides = parse_config_args([overrides_text] if overrides_text else None)
    except (OSError, KeyError, ValueError) as error:
        raise ConfigError(f"{app}: {error}") from error
    for key in overrides:
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f": did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--run-config: unknown config key '{key}'{hint}")
    fused = fuse_dicts(defaults, overrides)
    RunConfig.from_mapping(fused)
    return fused


def run(options: RunOptions) -> int:
    """Check, start, follow; 0 for a completed run, 1 for any other end, 2 for a refused
    config (nothing was sent then)."""
    try:
        checked_config(options.app, options.run_config)
    except ConfigError as error:
        print(f"run config refused: {error}", file=sys.stderr)
        return 2
    flwr = executable("flwr")
    started = _json(
        [flwr, "run", str(options.app), options.connection, "--format", "json"]
        + (["--run-config", options.run_config] if options.run_config else [])
    )
    if not started.get("success", True) or "run-id" not in started:
        print(f"flwr run failed: {started.get('error-message', started)}", file=sys.stderr)
        return 1
    run_id = str(started["run-id"])
    print(f"run {run_id} started; following its log (Ctrl-C stops following, not the run)")
    subprocess.run([flwr, "log", run_id, options.connection, "--stream"], check=False)
    listed = _json([flwr, "ls", options.connection, "--run-id", run_id, "--format", "json"])
    status = str(listed.get("runs", [{}])[0].get("status", "unknown"))
    print(f"run {run_id}: {status} (medfed coordinator pull {run_id} fetches its folder)")
    return 0 if status == "finished:completed" else 1


def _json(command: list[str]) -> dict[str, Any]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    try:  # (Flower may print a line before its JSON)
        return dict(json.loads(result.stdout[result.stdout.index("{") :]))
    except (ValueError, json.JSONDecodeError):
        return {"success": False, "error-message": (result.stderr or result.stdout).strip()}
