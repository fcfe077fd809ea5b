"""The cross-site matrix in report.md: its table and heat map, a missing cell blank."""

from __future__ import annotations

import matplotlib.image
import numpy as np

from medfed.server.run.cross_site_report import heat_grid
from medfed.server.run.report import write_report
from medfed.server.run.run_record import RunRecord
from tests.conftest import tiny_config

CROSS = {
    "mode": "all",
    "round": 2,
    "metric": "dice",
    "models": ["global", "site-a", "site-b"],
    "sites": ["site-a", "site-b"],
    "values": {
        "global": {"site-a": 0.8, "site-b": 0.7},
        "site-a": {"site-a": 0.9, "site-b": None},
        "site-b": {"site-a": 0.4, "site-b": 0.85},
    },
    "metrics": {},  # the report reads the headline values only
    "failures": {"site-a": {"site-b": "timed out: no reply after 600s"}},
    "unavailable": {},
    "seconds": 1.0,
}


def test_the_heat_grid_is_models_by_sites_with_missing_cells_masked():
    grid = heat_grid(CROSS)
    assert grid.shape == (3, 2)
    assert grid.mask.tolist() == [[False, False], [False, True], [False, False]]
    assert grid[2, 0] == 0.4 and grid[0, 1] == 0.7


def test_an_all_missing_matrix_still_has_its_shape():
    empty = {**CROSS, "values": {m: dict.fromkeys(CROSS["sites"]) for m in CROSS["models"]}}
    assert heat_grid(empty).shape == (3, 2) and heat_grid(empty).count() == 0


def _record(tmp_path, cross=None) -> None:
    record = RunRecord(tiny_config(task="segmentation"), tmp_path)
    record.add_round(
        {"round": 0, "seconds": 1.0, "global": {"dice": 0.5, "loss": 1.0}, "sites": {},
         "replied": [], "failed": [], "failures": {}}
    )  # fmt: skip
    if cross is not None:
        record.set_cross_site(cross)
    record.finish("completed")


def test_the_report_shows_the_matrix_blank_where_missing_and_its_heat_map(tmp_path):
    _record(tmp_path, CROSS)
    report = write_report(tmp_path).read_text()
    assert "## Cross-site evaluation after round 2" in report
    assert "| model | site-a | site-b |" in report
    assert "| site-a | 0.9000 |  |" in report, "a missing cell is blank, never 0"
    assert "- site-a model at site-b: timed out: no reply after 600s" in report
    assert "![cross-site](plots/cross-site.png)" in report
    image = matplotlib.image.imread(tmp_path / "plots" / "cross-site.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10, "not blank"


def test_without_a_matrix_the_report_has_no_section_and_no_stale_plot(tmp_path):
    _record(tmp_path, CROSS)
    write_report(tmp_path)
    _record(tmp_path)  # the same folder, a later run with cross-site = "off"
    report = write_report(tmp_path).read_text()
    assert "Cross-site" not in report and "cross-site.png" not in report
    assert not (tmp_path / "plots" / "cross-site.png").exists()
