"""The quality table: means and spreads over seeds, the gap to pooled, local models scored
elsewhere, failures shown as missing (never as numbers), strict JSON and a PNG."""

from __future__ import annotations

import json
import math

import pytest

from medfed.server.bench.quality_table import LOCAL_ELSEWHERE, QualityResults, write_outputs

SITES = ["site-0", "site-1"]


def _done(values: dict[str, float], **extra) -> dict:
    return {"status": "completed", "sites": {s: {"auc": v} for s, v in values.items()}, **extra}


def _results() -> QualityResults:
    results = QualityResults(task="classification", sites=SITES, config={})
    results.add("pooled", 0, _done({"site-0": 0.8, "site-1": 0.9}))
    results.add("pooled", 1, _done({"site-0": 0.6, "site-1": 0.7}))
    cross = {
        "site-0": {"site-0": {"auc": 0.7}, "site-1": {"auc": 0.5}},
        "site-1": {"site-0": {"auc": 0.4}, "site-1": {"auc": 0.9}},
    }
    for seed in (0, 1):
        results.add("local", seed, _done({"site-0": 0.7, "site-1": 0.9}, cross=cross))
    results.add("fedavg", 0, _done({"site-0": 0.75, "site-1": 0.75}))
    results.add("fedavg", 1, {"status": "failed", "error": "quorum lost"})
    return results


def _row(results: QualityResults, method: str) -> dict:
    return next(r for r in results.rows() if r["method"] == method)


def test_means_spreads_and_gap_to_pooled():
    results = _results()
    pooled = _row(results, "pooled")
    assert pooled["average"]["mean"] == pytest.approx(0.75)
    assert pooled["average"]["sd"] == pytest.approx(math.sqrt(0.02))  # averages 0.85, 0.65
    assert pooled["sites"]["site-0"]["mean"] == pytest.approx(0.7)
    local = _row(results, "local")
    assert local["gap-to-pooled-percent"] == pytest.approx((0.8 - 0.75) / 0.75 * 100)
    elsewhere = _row(results, LOCAL_ELSEWHERE)  # site-0 scored by site-1's model and back
    assert elsewhere["sites"]["site-0"]["mean"] == pytest.approx(0.4)
    assert elsewhere["sites"]["site-1"]["mean"] == pytest.approx(0.5)


def test_a_failed_run_is_counted_missing_and_the_table_incomplete():
    results = _results()
    fedavg = _row(results, "fedavg")
    assert fedavg["runs"] == "1/2" and fedavg["average"]["n"] == 1
    assert math.isnan(fedavg["average"]["sd"])
    assert not results.complete()
    complete = QualityResults(task="classification", sites=SITES, config={})
    complete.add("pooled", 0, _done({"site-0": 0.8, "site-1": 0.9}))
    assert complete.complete()
    complete.add("fedavg", 0, _done({"site-0": float("nan"), "site-1": 0.9}))
    assert not complete.complete()
    missing_site = QualityResults(task="classification", sites=SITES, config={})
    missing_site.add("fedbn", 0, _done({"site-0": 0.8}))
    assert not missing_site.complete()


def test_outputs_are_strict_json_markdown_and_png(tmp_path):
    paths = write_outputs(_results(), tmp_path)
    assert [p.name for p in paths] == ["quality.json", "quality.md", "quality.png"]

    def refuse(constant):
        raise ValueError(f"{constant} in JSON")

    data = json.loads(paths[0].read_text(), parse_constant=refuse)
    assert [r["method"] for r in data["table"]] == ["pooled", "local", LOCAL_ELSEWHERE, "fedavg"]
    assert data["metric"] == "auc" and not data["lower-is-better"]
    table = paths[1].read_text()
    assert "| fedavg | 0.750 | 0.750 | 0.750 | +0.0 % | 1/2 |" in table
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_site_that_hid_its_metric_is_missing_not_a_crash(tmp_path):
    """Issue 25: the README's `medfed bench quality` crashed writing its table ("must be real
    number, not str"): a site below its floor records its metrics as "hidden"."""
    results = QualityResults(task="classification", sites=SITES, config={})
    results.add("fedavg", 0, _done({"site-0": 0.8, "site-1": "hidden"}))
    fedavg = _row(results, "fedavg")
    assert fedavg["sites"]["site-1"]["n"] == 0 and math.isnan(fedavg["sites"]["site-1"]["mean"])
    assert fedavg["average"]["mean"] == pytest.approx(0.8)
    assert not results.complete()
    write_outputs(results, tmp_path)
    assert "site-1" in (tmp_path / "quality.md").read_text()
