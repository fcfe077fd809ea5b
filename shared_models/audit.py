"""Append-only JSON-lines audit log, written by the coordinator and by each site.

Both sides record the same kind of facts in the same format (who took part,
what was sent, which model came out) so that a consortium can reconcile the
coordinator's log with every hospital's. Entries hold identifiers, hashes,
array names and shapes and metric names only — never image data, file names
or metric values that could describe a patient.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

AUDIT_ENV = "MEDFED_AUDIT_LOG"


def audit(event: str, *, log: Path | None = None, **fields: Any) -> None:
    """Append one event to `log`, else to MEDFED_AUDIT_LOG (a no-op when neither is set)."""
    target = log or os.environ.get(AUDIT_ENV)
    if not target:
        return
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_APPEND: concurrent writers (several app processes) never interleave a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
