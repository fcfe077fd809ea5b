"""`medfed simulate --data`: the run's settings resolved from the site folders before
anything starts (server/simulation/simulate.prepare, the code path `medfed simulate` runs)."""

from __future__ import annotations

import pytest
import torch

from medfed.client.data.manifest import SiteDataError
from medfed.server.simulation.simulate import Simulation, prepare
from medfed.shared_models.tasks import TASKS
from tests.conftest import BRAIN, TINY, redeclared_sites, relabelled_sites


def simulation(tmp_path, data, sites, **overrides):
    return Simulation(overrides={**TINY, **overrides}, sites=sites, out=tmp_path / "run", data=data)


def test_classes_come_from_the_sites_when_the_run_names_none(tmp_path, seg_sites, capsys):
    data = relabelled_sites(seg_sites, tmp_path / "data", [BRAIN, BRAIN])
    cfg, _ = prepare(simulation(tmp_path, data, 2))
    assert cfg.classes == ("background", "brain")
    assert cfg.to_mapping()["class-names"] == "background,brain"  # what run-config.toml records
    out = capsys.readouterr().out
    assert out.count("classes from the sites' dataset.json: background, brain\n") == 1
    net = TASKS[cfg.task].build_network(cfg)
    assert net(torch.zeros(1, cfg.in_channels, 32, 32)).shape[1] == 2, "one output per class"


def test_sites_that_disagree_are_named_with_their_labels(tmp_path, seg_sites):
    default = {"0": "background", "1": "edema", "2": "tumour"}
    data = relabelled_sites(seg_sites, tmp_path / "data", [BRAIN, default, BRAIN])
    with pytest.raises(SiteDataError) as raised:
        prepare(simulation(tmp_path, data, 3))
    assert (
        "the sites' dataset.json declare different labels (site-0, site-2: [background, brain]; "
        "site-1: [background, edema, tumour])" in str(raised.value)
    )
    assert not (tmp_path / "run").exists()


def test_class_names_the_run_sets_win_over_the_sites(tmp_path, seg_sites, capsys):
    data = relabelled_sites(seg_sites, tmp_path / "data", [BRAIN, BRAIN])
    with pytest.raises(SiteDataError, match="do not match the run's classes"):
        prepare(simulation(tmp_path, data, 2, **{"class-names": "background,edema,tumour"}))
    assert "classes from the sites" not in capsys.readouterr().out


def test_classes_the_sites_declare_must_suit_the_task(tmp_path, seg_sites):
    data = relabelled_sites(seg_sites, tmp_path / "data", [{"0": "brain"}])
    with pytest.raises(ValueError, match=r"classes from the sites' dataset.json \(brain\): .*"):
        prepare(simulation(tmp_path, data, 1, **{"min-nodes": 1}))


def test_the_task_comes_from_the_sites_when_the_run_names_none(tmp_path, cls_sites, capsys):
    # site-1 names no task: it follows the sites that do
    declared = [{}, {"task": None}, {}]
    data = redeclared_sites(cls_sites, tmp_path / "data", declared)
    cfg, _ = prepare(simulation(tmp_path, data, 3))
    assert (cfg.task, cfg.model) == ("classification", "smallcnn")
    assert cfg.to_mapping()["task"] == "classification"  # what run-config.toml records
    assert cfg.classes == ("normal", "pneumonia", "covid")
    out = capsys.readouterr().out
    assert out.count("task from the sites' dataset.json: classification\n") == 1


def test_sites_that_declare_other_tasks_are_named_unless_the_run_names_one(
    tmp_path, cls_sites, capsys
):
    declared = [{"task": "classification"}, {"task": "regression"}, {"task": "classification"}]
    data = redeclared_sites(cls_sites, tmp_path / "data", declared)
    with pytest.raises(SiteDataError) as raised:
        prepare(simulation(tmp_path, data, 3))
    assert (
        "the sites' dataset.json declare different tasks (site-0, site-2: classification; "
        "site-1: regression); make them agree, or pass the run's --task" in str(raised.value)
    )
    assert not (tmp_path / "run").exists()

    cfg, _ = prepare(simulation(tmp_path, data, 3, task="classification"))  # --task wins
    assert cfg.task == "classification"
    assert "task from the sites" not in capsys.readouterr().out


def test_a_task_medfed_does_not_know_names_the_site_file(tmp_path, cls_sites):
    data = redeclared_sites(cls_sites, tmp_path / "data", [{}, {"task": "Task01_BrainTumour"}])
    with pytest.raises(SiteDataError) as raised:
        prepare(simulation(tmp_path, data, 2))
    message = str(raised.value)
    assert "site-1/dataset.json: task 'Task01_BrainTumour' is not one of segmentation," in message
    assert message.endswith("pass the run's --task")


def test_flower_loads_the_serverapp_without_torch_or_monai():
    """Flower loads the ServerApp and the ClientApp under one lock before a simulation
    starts its hospitals' workers: the run's heavy imports wait for the run itself."""
    import subprocess
    import sys

    code = (
        "import sys, medfed.server.app, medfed.client.app;"
        "print(sorted(m for m in ('torch', 'monai', 'matplotlib') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_a_run_ends_early_only_at_the_end_line_of_a_completed_record(tmp_path):
    import json

    from medfed.server.simulation.simulate import completed

    end_line = f"INFO :      [medfed-end] {tmp_path}\n"
    assert not completed(tmp_path, end_line)  # no record yet
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running"}))
    assert not completed(tmp_path, end_line)  # e.g. a site named like the line
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert completed(tmp_path, end_line)
    assert not completed(tmp_path, "INFO :      [medfed] wrote report.md\n")
    (tmp_path / "metrics.json").write_text("[1, 2")  # torn or foreign: keep streaming
    assert not completed(tmp_path, end_line)


@pytest.mark.parametrize("status", ["completed", "interrupted"])
def test_a_completed_run_stopped_before_its_report_gets_one(tmp_path, status):
    """The ServerApp leaves a completed run's report.md to `medfed simulate`; a command
    stopped between the run's end and the report still leaves one (a run it interrupted
    has its report from the ServerApp already, and nothing is written for it here)."""
    from medfed.server.run.run_record import RunRecord
    from medfed.server.simulation import simulate
    from tests.conftest import tiny_config

    record = RunRecord(tiny_config(), tmp_path)
    record.finish(status)
    simulate._report_if_missing(tmp_path)
    assert (tmp_path / "report.md").is_file() == (status == "completed")
