"""The coordinator's records of a site that hides its counts, through the real round loop and
the hospitals' real mods (tests/in_process_grid.py): nothing it keeps or shows depends on a
hidden count, and no average takes in the -1 marker a site sends for one."""

from __future__ import annotations

import io
import json
import math
import re
from functools import partial

import numpy as np
from flwr.app import Array, ArrayRecord
from prometheus_client import REGISTRY

from medfed.client.privacy.disclosure import SiteCounts
from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.hidden_counts import HIDDEN
from medfed.server.run.report import write_report
from medfed.server.run.round_loop import RoundLoop
from medfed.server.run.round_outputs import RunOutputs
from medfed.server.run.run_record import RunRecord
from medfed.server.run.strategies import build_strategy
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Metric, NodeConfig, Statistic
from tests.audit_log import read_audit
from tests.in_process_grid import InProcessGrid

NODES = [101, 202, 303]  # site-0, site-1, site-2
FLOOR = 10
# site-0 and site-1 clear the floor; site-2 is the demo's: 42 images split 34 / 8
SHOWN = {101: SiteCounts(40, 12, (52, 30, 25), presence=True),
         202: SiteCounts(20, 10, (30, 25, 12), presence=True)}  # fmt: skip
DEMO_SITE_2 = SiteCounts(34, 8, (42, 30, 25), presence=True)
OTHER_SITE_2 = SiteCounts(27, 7, (34, 2, 33), presence=True)  # just as hidden, other counts
# What varies from run to run whatever the sites hold: clocks, this process, the run's id,
# and the checkpoints' hashes (a checkpoint holds this process's random state; the model's
# own hash is in the audit lines, compared).
VOLATILE = {"seconds", "exchanges", "started", "finished", "process", "writer", "time", "run",
            "checkpoint-sha256"}  # fmt: skip


def run_with(tmp_path, site_2: SiteCounts, run_id: int, others=SHOWN):
    """Three rounds and the statistics, site-2 holding `site_2` (site-0 and site-1
    `others`); every node's floor is 10."""
    updates = {n: {"w": np.full(4, 0.1 * (i + 1), np.float32)} for i, n in enumerate(NODES)}
    cfg = RunConfig.from_mapping(
        {"task": "segmentation", "num-server-rounds": 2, "min-nodes": 3,
         "round-timeout-seconds": 1.0, "node-wait-seconds": 1.0, "federated-stats": True}
    )  # fmt: skip
    counts = {**others, 303: site_2}
    grid = InProcessGrid(updates, {n: float(c.train) for n, c in counts.items()}, cfg)
    grid.site_counts.update(counts)
    for context in grid.contexts.values():
        context.node_config[NodeConfig.MIN_COUNT] = FLOOR
    grid.evaluation = lambda message, node: {"loss": 1.0, "dice": 0.1 * NODES.index(node)}
    record = RunRecord(cfg, tmp_path)
    progress = io.StringIO()
    outputs = RunOutputs(record, RoundTelemetry(run_id, cfg.task), progress, run_id, cfg)
    loop = RoundLoop(grid, cfg, outputs, partial(build_strategy, cfg), run_id)
    loop.run(ArrayRecord({"w": Array(np.zeros(4, np.float32))}))
    record.finish("completed")
    write_report(tmp_path)
    return json.loads((tmp_path / "metrics.json").read_text()), progress.getvalue()


def without(data, keys=VOLATILE):
    """`data` with every key in `keys` left out, at any depth."""
    if isinstance(data, dict):
        return {k: without(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list):
        return [without(v, keys) for v in data]
    return data


CLOCKS = ("_timestamp_seconds", "_created")  # series that are times, not values


def prometheus_series(run_id: int) -> dict[tuple, float]:
    """The coordinator's series of one run, by name and labels (the run's id left out)."""
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "run"))): (
            sample.value
        )
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("run") == str(run_id) and not sample.name.endswith(CLOCKS)
    }


def test_global_metrics_never_average_a_hidden_count(tmp_path, monkeypatch):
    """Finding (c): Flower's weighted mean took site-2's -1 into the global `num-examples`
    (10.105 in the demo). Counts are left out of the global metrics; so are the quality
    metrics of site-2, whose counts are hidden (each is a fraction over its 8 images): the
    global Dice is the mean of the sites that show theirs."""
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    metrics, progress = run_with(tmp_path, DEMO_SITE_2, run_id=41)
    for entry in metrics["rounds"]:
        assert not set(entry["global"]) & {*Metric.HIDEABLE, Metric.WEIGHT}, entry["global"]
        assert math.isclose(entry["global"]["dice"], (12 * 0.0 + 10 * 0.1) / 22)
    site_2 = metrics["rounds"][-1]["sites"]["site-2"]
    assert site_2["num-examples"] == site_2["train-examples"] == HIDDEN
    assert site_2["images-per-second"] == site_2["generated-images"] == HIDDEN
    assert site_2[Metric.WEIGHT] == FLOOR
    assert metrics["rounds"][-1]["sites"]["site-0"]["train-examples"] == 40
    statistics = metrics["site-statistics"]
    assert statistics["site-2"][Statistic.NUM_TRAIN] == HIDDEN
    assert set(statistics["site-2"][Statistic.LABEL_HISTOGRAM]) == {HIDDEN}
    # 25 of site-1's 30 images show class 1: the 5 without it would follow
    assert statistics["site-1"][Statistic.LABEL_HISTOGRAM] == [30, HIDDEN, 12]
    report = (tmp_path / "report.md").read_text()
    assert "| site-2 | 10 | hidden | hidden | hidden | hidden | hidden |" in report
    assert "<10" not in report and "<10" not in progress, "a hidden 34 is not below 10"
    assert REGISTRY.get_sample_value("medfed_site_training_examples", {"site": "site-2"}) != 34


def test_nothing_the_coordinator_records_depends_on_a_hidden_count(tmp_path, monkeypatch):
    """Two federations alike but for site-2's hidden counts (34 / 8 with its histogram, or
    27 / 7 with another): metrics.json, report.md, the progress log, the audit lines and the
    coordinator's Prometheus series are the same, clocks aside."""
    views = []
    for run_id, site_2 in ((51, DEMO_SITE_2), (52, OTHER_SITE_2)):
        out = tmp_path / str(run_id)
        monkeypatch.setenv(AUDIT_ENV, str(out / "audit.jsonl"))
        metrics, progress = run_with(out, site_2, run_id)
        report = (out / "report.md").read_text()
        views.append(
            {
                "metrics.json": without(metrics),
                "report.md": re.sub(r"[\d.]+s of rounds|\| [\d.]+ \|\n", "", report),
                "progress": re.sub(r"\d+\.\ds\n", "\n", progress),
                # sorted: the sites answer in the order of Flower's (random) sampler
                "audit": sorted(json.dumps(e) for e in without(read_audit(out / "audit.jsonl"))),
                "prometheus": prometheus_series(run_id),
            }
        )
        assert math.isnan(
            REGISTRY.get_sample_value("medfed_site_training_examples", {"site": "site-2"})
        ), "the node's gauge shows what it sent"
    assert views[0]["prometheus"], "the coordinator's series of the run were found"
    assert views[0]["audit"], "the coordinator and the sites audited the run"
    for view in views[0]:
        assert views[0][view] == views[1][view], view


def test_rounds_whose_every_site_hides_say_hidden_and_why_once(tmp_path):
    """Issue 25: `medfed simulate --task segmentation3d` (24 volumes a site, 5 to validate)
    printed `val dice nan` for 20 rounds: every site was below its floor."""
    small = {101: DEMO_SITE_2, 202: OTHER_SITE_2}
    metrics, progress = run_with(tmp_path, DEMO_SITE_2, 7, others=small)
    assert all("dice" not in entry["global"] for entry in metrics["rounds"])
    lines = [line for line in progress.splitlines() if line.startswith("round ")]
    assert len(lines) == 3 and all("| val dice hidden | val loss hidden |" in x for x in lines)
    assert "nan" not in progress
    assert progress.count("no validation dice reached the coordinator") == 1
