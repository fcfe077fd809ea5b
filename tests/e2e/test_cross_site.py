"""Cross-site evaluation in a real simulated federation (`medfed simulate`, Ray workers):
every hospital's last local model and the global model, evaluated at every hospital."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from medfed.shared_models.audit import AUDIT_ENV
from tests.audit_log import read_audit
from tests.e2e.test_simulation import TINY_RUN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ["site-0", "site-1", "site-2"]


def test_all_gives_a_full_matrix_in_metrics_json_report_and_audit(tmp_path, seg_sites):
    out, audit_log = tmp_path / "run", tmp_path / "audit.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--sites", "3", "--rounds", "1",
         "--data", str(seg_sites), "--out", str(out), *TINY_RUN,
         "-c", "cross-site=all", "-c", "federated-stats=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, AUDIT_ENV: str(audit_log)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    cross = metrics["cross-site"]
    assert (cross["mode"], cross["round"], cross["metric"]) == ("all", 1, "dice")
    assert cross["models"] == ["global", *SITES] and cross["sites"] == SITES
    assert cross["failures"] == {} and cross["unavailable"] == {}
    for model in cross["models"]:
        for site in SITES:
            value = cross["values"][model][site]
            assert isinstance(value, float) and math.isfinite(value), (model, site)
            assert 0.0 <= value <= 1.0
            assert cross["metrics"][model][site]["dice"] == value
    final = metrics["rounds"][-1]["sites"]
    assert {s: final[s]["dice"] for s in SITES} == cross["values"]["global"]

    report = (out / "report.md").read_text()
    assert "![cross-site](plots/cross-site.png)" in report
    assert (out / "plots" / "cross-site.png").stat().st_size > 1000
    # each hospital's audit names the other hospitals' models it ran; the coordinator's the matrix
    events = read_audit(audit_log)
    evaluated = [e for e in events if e["event"] == "round-evaluated" and "model" in e]
    ran = [(e["site"], e["model"]) for e in evaluated]
    assert sorted(ran) == sorted((site, model) for site in SITES for model in SITES)
    (matrix,) = [e for e in events if e["event"] == "cross-site"]
    assert (matrix["models"], matrix["sites"], matrix["failed"]) == (cross["models"], SITES, [])
