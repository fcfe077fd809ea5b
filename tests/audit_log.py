"""The entries of an audit log (shared_models/audit.py), for the tests to read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every entry of the audit log at `path`, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
