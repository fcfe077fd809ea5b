"""Running `medfed simulate` from a benchmark, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def simulate(out: Path, task: str, rounds: int, *config: str, data: Path | None = None) -> dict:
    """One `medfed simulate` run (synthetic sites unless `data`); its metrics.json.

    Each `config` item is a KEY=VALUE run-config override. Exits with the run's
    output when it fails.
    """
    command = [sys.executable, "-m", "medfed.server.cli", "simulate", "--task", task,
               "--rounds", str(rounds), "--out", str(out)]  # fmt: skip
    if data is not None:
        command += ["--data", str(data)]
    for item in config:
        command += ["-c", item]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{task} run failed:\n{result.stdout}\n{result.stderr}")
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def save_results(folder: Path, name: str, results: Any) -> Path:
    """The benchmark's results as folder/name (JSON), for docs/benchmarks.md."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(results, indent=2))
    return path


def print_table(columns: dict[str, int], rows: list[list[str]]) -> None:
    """Rows under the column names, each right-aligned to its width (the first left)."""
    widths = list(columns.values())

    def line(cells: list[str]) -> str:
        first, *rest = cells
        aligned = (f"{cell:>{width}}" for cell, width in zip(rest, widths[1:], strict=True))
        return " ".join([f"{first:<{widths[0]}}", *aligned])

    print(line(list(columns)))
    for row in rows:
        print(line(row))
