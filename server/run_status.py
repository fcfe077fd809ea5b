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

from medfed.server.report import write_report
from medfed.shared_models import processes
from medfed.shared_models.audit import audit
from medfed.shared_models.run_folder import METRICS_JSON, RunFolderError, read_metrics
from medfed.shared_models.runtime import atomic_write

DIED = (
    "the ServerApp process ended without finishing the run (killed, crashed, or its host "
    "restarted); carry it on with resume-from"
)


def is_orphaned(run_dir: Path) -> bool:
    """Whether the run's record says running but the process writing it is gone."""
    try:
        data = read_metrics(run_dir)
    except RunFolderError:
        return False
    return (
        data is not None
        and data.get("status") == "running"
        and not processes.is_running(data.get("process") or {})
    )


def close(run_dir: Path, status: str, reason: str, log: Path | None = None) -> bool:
    """Mark an orphaned run `status` with `reason`, audit it and write its report.

    Returns False (and changes nothing) when the run is not orphaned: it has
    finished, or its ServerApp is still alive and will record the outcome itself.
    """
    if not is_orphaned(run_dir):
        return False
    data = read_metrics(run_dir) or {}
    data.update(status=status, error=reason, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write(run_dir / METRICS_JSON, json.dumps(data, indent=2, allow_nan=True).encode())
    run = int(run_dir.name) if run_dir.name.isdigit() else str(run_dir)
    audit("run-finished", log=log, run=run, status=status, error=reason)
    try:
        write_report(run_dir)
    except (OSError, ValueError, KeyError) as err:  # the record itself is what matters
        print(f"medfed: warning: no report for {run_dir}: {err}")
    return True


def close_orphaned(
    run_dirs: Iterable[Path], status: str, reason: str, log: Path | None
) -> list[Path]:
    """`close` every orphaned run among `run_dirs`; the ones closed, each announced."""
    closed = [d for d in run_dirs if d.is_dir() and close(d, status, reason, log)]
    for run_dir in closed:
        print(f"medfed: run {run_dir.name} marked {status}: {reason}", flush=True)
    return closed
