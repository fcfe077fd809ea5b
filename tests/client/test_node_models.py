"""Run folders a run config names at a deployed hospital: names under its models folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client import node_models
from medfed.client.approval import STATE_ENV
from medfed.shared_models.config import ConfigError
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gan-model", "/srv/pacs/export"),
        ("gan-model", "../../etc"),
        ("gan-feature-model", "runs/../../secret"),
        ("gan-feature-model", "/home/radiology/model"),
    ],
)
def test_a_deployed_node_refuses_a_run_folder_path_of_the_operators_choosing(
    tmp_path, monkeypatch, key, value
):
    """The operator's run config once made every node open (and so test for) a path of its
    choosing: an existence oracle on the hospital's disk. A deployed node takes a name."""
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "node-state"))
    settings = {"gan_feature_model": value} if key == "gan-feature-model" else {}
    if key == "gan-model":
        settings = {"gan_model": value, "gan_augment_ratio": 1.0, "task": "classification"}
    with pytest.raises(ConfigError, match=f"config key '{key}'.*models/"):
        node_models.resolve(tiny_config(**{"task": "gan", **settings}))


def test_a_name_is_the_folder_under_the_nodes_models(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "node-state"))
    cfg = tiny_config(task="gan", gan_feature_model="cls-run-7")
    assert node_models.resolve(cfg).gan_feature_model == str(
        tmp_path / "node-state" / "models" / "cls-run-7"
    )


def test_a_simulation_takes_the_paths_as_they_are(monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    cfg = tiny_config(task="gan", gan_feature_model="/data/runs/cls")
    assert node_models.resolve(cfg) == cfg
    assert Path(node_models.resolve(cfg).gan_feature_model).is_absolute()
