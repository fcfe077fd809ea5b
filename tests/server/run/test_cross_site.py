"""Cross-site evaluation over an in-process grid: which model reached which hospital, the
matrix in metrics.json and Prometheus, failures recorded by site and never fatal."""

from __future__ import annotations

import io
import json
import re
from functools import partial

import pytest
from flwr.app import Array, ArrayRecord, Message
from prometheus_client import REGISTRY

from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.cross_site import CrossSiteMatrix
from medfed.server.run.replies import RoundReplies, SiteNames
from medfed.server.run.round_loop import RoundLoop
from medfed.server.run.round_outputs import RunOutputs
from medfed.server.run.run_record import RunRecord
from medfed.server.run.strategies import build_strategy
from medfed.shared_models.protocol import Config, Record
from tests.in_process_grid import RUN_ID
from tests.server.run.test_round_loop import START, grid_of

DELTAS = {101: 1.0, 202: 2.0, 303: 4.0}  # site-0, site-1, site-2: each local model's value
OFFSET = {101: 0.0, 202: 0.01, 303: 0.02}  # what each evaluating site adds
SITES = ["site-0", "site-1", "site-2"]
GLOBAL = sum(DELTAS.values()) / 3  # one round, equal weights: the final global model


def scoring(grid) -> None:
    """Every hospital scores a model by its weights' mean plus its own offset: each cell
    says which model reached which hospital."""

    def evaluation(message: Message, node: int) -> dict:
        w = message.content[Record.ARRAYS]["w"].numpy()
        return {"loss": 1.0, "auc": float(w.mean()) + OFFSET[node]}

    grid.evaluation = evaluation


def cross_site_run(tmp_path, run_id: int = RUN_ID, before=None, **config):
    """A one-round run and its cross-site evaluation: (metrics.json, grid, progress text)."""
    grid, cfg = grid_of(DELTAS, **{"num-server-rounds": 1, "cross-site": "all", **config})
    scoring(grid)
    if before:
        before(grid)
    progress = io.StringIO()
    outputs = RunOutputs(
        RunRecord(cfg, tmp_path), RoundTelemetry(run_id, cfg.task), progress, run_id, cfg
    )
    loop = RoundLoop(grid, cfg, outputs, partial(build_strategy, cfg), run_id)
    loop.run(ArrayRecord({k: Array(v) for k, v in START.items()}))
    loop.cross_site()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    return metrics, grid, progress.getvalue()


def test_all_evaluates_every_local_model_at_every_hospital(tmp_path):
    metrics, _, _ = cross_site_run(tmp_path)
    cross = metrics["cross-site"]
    assert (cross["mode"], cross["round"], cross["metric"]) == ("all", 1, "auc")
    assert cross["models"] == ["global", *SITES] and cross["sites"] == SITES
    for site, offset in zip(SITES, OFFSET.values(), strict=True):
        assert cross["values"]["global"][site] == pytest.approx(GLOBAL + offset)
        for model, delta in zip(SITES, DELTAS.values(), strict=True):
            assert cross["values"][model][site] == pytest.approx(delta + offset), (model, site)
    assert cross["metrics"]["site-1"]["site-2"] == {"loss": 1.0, "auc": pytest.approx(2.02)}
    assert cross["failures"] == {} and cross["unavailable"] == {}


def test_the_global_row_is_the_final_rounds_evaluation_and_needs_no_message(tmp_path):
    metrics, grid, _ = cross_site_run(tmp_path, **{"cross-site": "global"})
    cross = metrics["cross-site"]
    assert cross["models"] == ["global"]
    final = metrics["rounds"][-1]["sites"]
    assert {s: final[s]["auc"] for s in final} == cross["values"]["global"]
    evaluations = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert len(evaluations) == 2 * 3, "rounds 0 and 1 only"


def test_off_records_no_matrix(tmp_path):
    metrics, _, progress = cross_site_run(tmp_path, **{"cross-site": "off"})
    assert "cross-site" not in metrics and "cross-site" not in progress


def test_each_hospital_is_told_whose_model_it_evaluates(tmp_path):
    _, grid, _ = cross_site_run(tmp_path)
    named = [
        (m.content[Record.CONFIG].get(Config.CROSS_SITE_MODEL), m.metadata.dst_node_id)
        for m in grid.pushed
        if m.metadata.message_type == "evaluate"
    ]
    assert [model for model, _ in named[:6]] == [None] * 6  # the rounds' own evaluations
    assert sorted(named[6:]) == sorted((site, node) for site in SITES for node in DELTAS)


def test_a_failing_hospital_leaves_null_cells_with_reasons_and_the_run_goes_on(tmp_path):
    def site_2_breaks_on_other_sites_models(grid) -> None:
        honest = grid.evaluation

        def evaluation(message: Message, node: int) -> dict:
            if node == 303 and Config.CROSS_SITE_MODEL in message.content[Record.CONFIG]:
                raise RuntimeError("CUDA out of memory")
            return honest(message, node)

        grid.evaluation = evaluation

    metrics, _, progress = cross_site_run(tmp_path, before=site_2_breaks_on_other_sites_models)
    cross = metrics["cross-site"]
    assert [cross["values"][m]["site-2"] for m in SITES] == [None] * 3
    assert cross["metrics"]["site-0"]["site-2"] is None
    assert cross["values"]["global"]["site-2"] == pytest.approx(GLOBAL + 0.02)
    assert cross["values"]["site-1"]["site-0"] == pytest.approx(2.0)
    assert cross["failures"] == {
        "site-0": {"site-2": "error: RuntimeError: CUDA out of memory"},
        "site-1": {"site-2": "not asked: it failed the evaluation of site-0's model"},
        "site-2": {"site-2": "not asked: it failed the evaluation of site-0's model"},
    }
    assert "  site-0 model at site-2: error: RuntimeError: CUDA out of memory" in progress


def test_a_site_without_a_final_round_update_has_a_row_of_nulls_and_its_reason(tmp_path):
    def site_1_never_trains(grid) -> None:
        grid.drop["upload"] = {202}

    metrics, _, _ = cross_site_run(
        tmp_path, before=site_1_never_trains, **{"round-timeout-seconds": 0.2}
    )
    cross = metrics["cross-site"]
    assert cross["models"] == ["global", *SITES]
    assert set(cross["values"]["site-1"].values()) == {None}
    assert cross["unavailable"]["site-1"].startswith(
        "its final-round update failed: timed out: no reply"
    )
    assert cross["values"]["site-2"]["site-1"] == pytest.approx(4.01), "it still evaluates"


def test_prometheus_holds_the_matrix_by_model_and_site(tmp_path):
    run_id = 9311
    cross_site_run(tmp_path, run_id)

    def sample(model: str, site: str) -> float | None:
        labels = {"run": str(run_id), "task": "classification", "metric": "auc"}
        return REGISTRY.get_sample_value(
            "medfed_cross_site_metric", {**labels, "model": model, "site": site}
        )

    assert sample("site-0", "site-1") == pytest.approx(1.01)
    assert sample("site-2", "site-0") == pytest.approx(4.0)
    assert sample("global", "site-2") == pytest.approx(GLOBAL + 0.02)


def test_the_progress_log_shows_the_matrix(tmp_path):
    _, _, progress = cross_site_run(tmp_path)
    assert "cross-site evaluation after round 1 (auc;" in progress
    assert re.search(r"^site-1 +2\.0000 +2\.0100 +2\.0200$", progress, re.M), progress


def test_a_missing_cell_is_null_in_json():
    matrix = CrossSiteMatrix("all", 3, "dice", models=["global"])
    matrix.add_row("global", RoundReplies(failed={"site-1": "timed out"}), SiteNames())
    matrix.extra_sites |= {"site-0"}
    cross = json.loads(json.dumps(matrix.to_json()))
    assert cross["sites"] == ["site-0", "site-1"]
    assert cross["values"] == {"global": {"site-0": None, "site-1": None}}
    assert cross["metrics"] == {"global": {"site-0": None, "site-1": None}}
    assert cross["failures"] == {"global": {"site-1": "timed out"}}
