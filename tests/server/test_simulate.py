"""`medfed simulate --data`: the run's settings resolved from the site folders before
anything starts (server/simulate.prepare, the code path `medfed simulate` runs)."""

from __future__ import annotations

import pytest
import torch

from medfed.client.data.manifest import SiteDataError
from medfed.server.simulate import Simulation, prepare
from medfed.shared_models.tasks import TASKS
from tests.conftest import BRAIN, TINY, relabelled_sites


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
