"""Closing the record of a run whose ServerApp can no longer close it itself.

A ServerApp killed with SIGKILL, or lost with its host, leaves metrics.json
saying "running" forever, and Flower's `flwr run --stream` even exits 0. The
process that started it (`medfed simulate`) or the coordinator that hosts it
(`medfed coordinator start`, every few seconds and again when it starts)
notices that the process recorded in the run folder is gone and closes the
record: status, reason, audit entry and report, as the ServerApp would have.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medfed.server.report import write_report
from medfed.shared_models import processes
from medfed.shared_models.audit import audit
from medfed.shared_models.run_folder import METRICS_JSON, RunFolderError, read_metrics
from medfed.shared_models.runtime import atomic_write

DIED = (
    "the ServerApp process ended without finishing the run (killed, crashed, or its host "
    "restarted); carry it on with resume-from"
)


def orphaned_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record when it says running but its ServerApp is provably gone, else None
    (finished, alive, on another host or namespace, or not a record at all)."""
    try:
        data = read_metrics(run_dir)
    except RunFolderError:
        return None
    if data is None or data.get("status") != "running":
        return None
    return data if processes.liveness(data.get("process")) == "dead" else None


def close(run_dir: Path, status: str, reason: str, log: Path | None = None) -> bool:
    """Mark an orphaned run `status` with `reason`, audit it and write its report.

    Returns False (and changes nothing) when the run is not orphaned. The
    record is written only if the one read is still the one on disk (its
    writer unchanged): a ServerApp that has just taken the folder over wins.
    """
    data = orphaned_record(run_dir)
    if data is None:
        return False
    data.update(status=status, error=reason, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    current = read_metrics(run_dir) or {}
    if current.get("writer") != data.get("writer") or current.get("status") != "running":
        return False
    atomic_write(run_dir / METRICS_JSON, json.dumps(data, indent=2, allow_nan=True).encode())
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
