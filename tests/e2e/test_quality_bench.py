"""`medfed bench quality` end to end, reduced (2 seeds, 2 rounds): pooled, local, and real
federations (FedAvg, FedBN) give a complete table of finite numbers, as JSON, markdown and
PNG. Values are not asserted: on a few tiny synthetic images they are noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.e2e.test_simulation import TINY_RUN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_quality_command_writes_a_complete_table(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "bench", "quality", "--task",
         "classification", "--sites", "3", "--rounds", "2", "--seeds", "2",
         "--images-per-site", "20", "--methods", "pooled,local,fedavg,fedbn",
         "--out", str(out), *TINY_RUN, "-c", "local-epochs=1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "quality.json").read_text())
    methods = [row["method"] for row in data["table"]]
    assert methods == ["pooled", "local", "local, on other sites", "fedavg", "fedbn"]
    assert data["sites"] == ["site-0", "site-1", "site-2"]
    for row in data["table"]:
        assert row["runs"] == "2/2", row
        assert math.isfinite(row["average"]["mean"]) and math.isfinite(row["average"]["sd"])
        assert all(math.isfinite(row["sites"][s]["mean"]) for s in data["sites"]), row
    assert data["config"]["norm"] == "batch"  # one network for every method
    for method in ("fedavg", "fedbn"):
        run = json.loads((out / "runs" / f"{method}-seed1" / "metrics.json").read_text())
        assert run["status"] == "completed" and run["config"]["strategy"] == method
    table = (out / "quality.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert (out / "quality.png").stat().st_size > 0
