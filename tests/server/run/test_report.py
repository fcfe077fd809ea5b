"""report.md and its plots, rebuilt from metrics.json alone."""

from __future__ import annotations

import json

import pytest

from medfed.server.run.hidden_counts import HIDDEN
from medfed.server.run.report import write_report
from medfed.server.run.run_record import RunRecord
from medfed.shared_models.protocol import SUPPRESSED, Statistic
from tests.conftest import tiny_config


def test_report_tells_status_rounds_failures_and_hidden_counts(tmp_path):
    cfg = tiny_config(task="classification", stats_min_count=5)
    record = RunRecord(cfg, tmp_path)
    record.set_statistics(
        {
            "site-a": {
                Statistic.NUM_TRAIN: 30,
                Statistic.NUM_VAL: 8,
                Statistic.LABEL_HISTOGRAM: [20, HIDDEN, HIDDEN],
                Statistic.INTENSITY_P1: 0.02,
                Statistic.INTENSITY_P99: 0.98,
                Statistic.INTENSITY_HISTOGRAM: [0.5, 0.5],
                Statistic.MIN_COUNT: 5,
            },
            "site-c": {  # a site whose own floor is above the coordinator's ask
                Statistic.NUM_TRAIN: HIDDEN,
                Statistic.NUM_VAL: HIDDEN,
                Statistic.LABEL_HISTOGRAM: [HIDDEN, HIDDEN, HIDDEN],
                Statistic.INTENSITY_P1: 0.02,
                Statistic.INTENSITY_P99: 0.98,
                Statistic.INTENSITY_HISTOGRAM: [0.5, 0.5],
                Statistic.MIN_COUNT: 20,
            },
        }
    )
    site = {"auc": 0.61, "loss": 0.9, "num-examples": HIDDEN, "aggregation-weight": 10.0}
    # a run folder written before counts were recorded as "hidden" holds the site's marker
    trained = {**site, "train-examples": SUPPRESSED, "images-per-second": float(SUPPRESSED)}
    record.add_round(
        {"round": 0, "seconds": 1.0, "global": {"auc": 0.5, "loss": 1.1}, "sites": {"site-a": site},
         "replied": ["site-a", "site-b"], "failed": [], "failures": {}}
    )  # fmt: skip
    record.add_round(
        {"round": 1, "seconds": 2.0, "global": {"auc": 0.7, "loss": 0.8, "train-loss": 0.9},
         "sites": {"site-a": trained}, "replied": ["site-a"], "failed": ["site-b"],
         "failures": {"site-b": "timed out: no reply after 600s"}}
    )  # fmt: skip
    record.finish("completed")
    report = write_report(tmp_path).read_text()
    assert "Status: **completed**" in report
    assert "Global validation auc: 0.5000 at round 0 → 0.7000 after round 1" in report
    assert "| 1 | 1 | site-b | 0.9000 | 0.8000 | 0.7000 | 2.0 |" in report
    assert "| site-a | 5 | 30 | 8 | 20 | hidden | hidden | 0.02 | 0.98 |" in report
    assert "| site-c | 20 | hidden | hidden | hidden | hidden | hidden | 0.02 | 0.98 |" in report
    assert "<" not in report.split("## Sites before training")[1].split("![")[0], "no bound"
    # after training: the hidden counts are hidden, the raised weight not shown at all
    assert "| site | auc | images-per-second | loss | num-examples | train-examples |" in report
    assert "| site-a | 0.6100 | *hidden* | 0.9000 | *hidden* | *hidden* |" in report
    assert (tmp_path / "plots" / "global.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "sites.png").stat().st_size > 1000


@pytest.mark.parametrize("launcher", [False, True])
def test_a_completed_runs_report_is_written_once(tmp_path, monkeypatch, launcher):
    """The ServerApp writes report.md, unless `medfed simulate` started it: the launcher
    writes a completed run's report itself, after the predictions it draws for it."""
    from medfed.server.run import federated_run, report
    from tests.round_walk import federation

    if launcher:
        monkeypatch.setenv(report.LAUNCHER_WRITES_REPORT_ENV, "1")
    else:
        monkeypatch.delenv(report.LAUNCHER_WRITES_REPORT_ENV, raising=False)
    written = []
    monkeypatch.setattr(
        federated_run, "write_report", lambda out: written.append(out) or out / "report.md"
    )
    grid, context, _ = federation(tmp_path, num_server_rounds=1)
    federated_run.run(grid, context)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    assert written == ([] if launcher else [tmp_path / "run"])


def test_a_failed_runs_report_is_the_serverapps_even_under_the_launcher(tmp_path, monkeypatch):
    """The launcher writes a completed run's report only: a failed run's is written by the
    ServerApp as it ends."""
    from medfed.server.run import federated_run, report
    from tests.round_walk import federation

    monkeypatch.setenv(report.LAUNCHER_WRITES_REPORT_ENV, "1")
    grid, context, _ = federation(tmp_path, num_server_rounds=1, min_nodes=4, node_wait_seconds=0.1)
    with pytest.raises(Exception, match="hospitals"):
        federated_run.run(grid, context)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed"
    assert (tmp_path / "run" / "report.md").is_file()
