"""A simulated run that failed before its first round completed: nothing to carry on.

A newcomer's classification run died at start (Ray's raylet missed its
heartbeats while another job loaded the machine), was told to carry it on
with resume-from, and `--resume` then refused: "no completed round to resume
from". Such a run is started again instead, with its own settings: once by
itself when Ray's own machinery failed (a transient failure), and by
`medfed simulate --resume` whatever the reason. The failed attempt's record
is kept under logs/, never overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path

from medfed.shared_models.run_folder import METRICS_JSON, RunFolderError, read_metrics

# Ray's failures of its own processes (a worker, an actor, a raylet or a node lost), as a
# hospital's failure reason or Ray's own lines in the run's Flower log name them: not the
# hospital's code or data. Seen with a raylet killed at start: "The actor never ran - it
# was cancelled before it started running." and "(raylet) Raylet is terminated".
RAY_FAILURE = re.compile(
    r"Raylet is terminated|The actor never ran|The actor died|missed too many heartbeats|"
    r"\b(?:ActorDiedError|ActorUnavailableError|LocalRayletDiedError|NodeDiedError|"
    r"RayActorError|RaySystemError|WorkerCrashedError|OwnerDiedError)\b"
)
FLOWER_LOG = Path("logs") / "flower-run.log"


def nothing_completed(out: Path) -> bool:
    """Whether the run in `out` ended (not running) without a single completed round."""
    try:
        record = read_metrics(out)
    except RunFolderError:
        return False
    return record is not None and record.get("status") != "running" and not record.get("rounds")


def ray_failure(out: Path) -> str | None:
    """The Ray failure that ended the run in `out` before any round completed, if that is
    what ended it (worth one more try): in its record's error, else in its Flower log."""
    if not nothing_completed(out):
        return None
    record = read_metrics(out) or {}
    log = out / FLOWER_LOG
    for text in (str(record.get("error", "")), log.read_text() if log.is_file() else ""):
        found = RAY_FAILURE.search(text)
        if found:
            return found.group(0)
    return None


def set_aside(out: Path) -> Path:
    """Move the failed attempt's metrics.json to logs/attempt-N-metrics.json; its path."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while (logs / f"attempt-{attempt}-{METRICS_JSON}").exists():
        attempt += 1
    kept = logs / f"attempt-{attempt}-{METRICS_JSON}"
    (out / METRICS_JSON).rename(kept)
    return kept
