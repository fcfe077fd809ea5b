"""Closing the record of a run whose ServerApp can no longer close it itself.

A ServerApp killed with SIGKILL, or lost with its host, leaves metrics.json
saying "running" forever, and Flower's `flwr run --stream` even exits 0. The
process that started it (`medfed simulate`) or the coordinator that hosts it
(`medfed coordinator start`, every few seconds and again when it starts)
notices that the process writing the run is gone (it no longer holds the
folder's writer lock, which the kernel releases with it, in any container) and
closes the record: status, reason, audit entry and report, as the ServerApp
would have.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medfed.server.run.report import write_report
from medfed.shared_models import processes
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.audit import audit
from medfed.shared_models.run_folder import (
    METRICS_JSON,
    RunFolderError,
    read_metrics,
    writer_gone,
)

DIED = (
    "the ServerApp process ended without finishing the run (killed, crashed, or its host "
    "restarted); carry it on with resume-from"
)


def _running_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = read_metrics(run_dir)
    except RunFolderError:
        return None
    return data if data is not None and data.get("status") == "running" else None


def _gone(data: dict[str, Any], lock_says: bool | None) -> bool:
    """The writer's lock decides; a folder without one (an older medfed) falls back on the
    recorded process, closed only when this machine can tell it is dead."""
    if lock_says is not None:
        return lock_says
    return processes.liveness(data.get("process")) == "dead"


def is_orphaned(run_dir: Path) -> bool:
    """Whether the run's record says running while the process writing it is gone."""
    with writer_gone(run_dir) as lock_says:
        data = _running_record(run_dir)
        return data is not None and _gone(data, lock_says)


def closed_record(data: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """`data` as the record of a run that ended `status` for `reason`."""
    return {
        **data,
        "status": status,
        "error": reason,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def close(run_dir: Path, status: str, reason: str, log: Path | None = None) -> bool:
    """Mark an orphaned run `status` with `reason`, audit it and write its report.

    Returns False (and changes nothing) when the run is not orphaned. The
    writer's lock is held while the record is rewritten, so a ServerApp
    taking the folder over (a run resumed in place) waits for it.
    """
    with writer_gone(run_dir) as lock_says:
        data = _running_record(run_dir)
        if data is None or not _gone(data, lock_says):
            return False
        text = json.dumps(closed_record(data, status, reason), indent=2, allow_nan=True)
        atomic_write(run_dir / METRICS_JSON, text.encode())
    run = int(run_dir.name) if run_dir.name.isdigit() else str(run_dir)
    audit("run-finished", log=log, run=run, status=status, error=reason)
    try:
        write_report(run_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:  # the record is what matters
        print(f"medfed: warning: no report for {run_dir}: {err}")
    return True


def close_orphaned(
    run_dirs: Iterable[Path], status: str, reason: str, log: Path | None
) -> list[Path]:
    """`close` every orphaned run among `run_dirs`; the ones closed, each announced."""
    closed = []
    for run_dir in run_dirs:
        try:
            if run_dir.is_dir() and close(run_dir, status, reason, log):
                closed.append(run_dir)
                print(f"medfed: run {run_dir.name} marked {status}: {reason}", flush=True)
        except (OSError, ValueError) as err:  # one broken folder never blocks the others
            print(f"medfed: warning: {run_dir}: {err}", flush=True)
    return closed
