"""The run folder on disk: status, rounds, checkpoints and the final model, written atomically."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from medfed.server.run_record import RunRecord
from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.tasks import TASKS
from tests.conftest import tiny_config


def test_the_folder_tells_the_status_and_every_round(tmp_path):
    cfg = tiny_config(task="classification")
    record = RunRecord(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "running"
    record.add_round({"round": 0, "global": {"auc": 0.5}})
    record.finish("failed", error="round 1 training: 1 hospitals replied, quorum is 2")
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["status"] == "failed" and "quorum is 2" in data["error"]
    assert data["rounds"] == [{"round": 0, "global": {"auc": 0.5}}]
    assert data["config"]["task"] == "classification"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "no temporary files left"


def test_checkpoints_and_the_model_rebuild_the_network(tmp_path):
    cfg = tiny_config(task="classification")
    net = TASKS["classification"].build_network(cfg)
    record = RunRecord(cfg, tmp_path)
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32))})
    path = record.checkpoint(3, arrays)
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 3 and saved["config"] == cfg.to_mapping()
    assert torch.equal(saved["arrays"]["w"], torch.arange(6, dtype=torch.float32))
    digest = record.save_model(net, cfg, 3)
    assert digest == hashlib.sha256((tmp_path / "global_model.pt").read_bytes()).hexdigest()
    loaded_cfg, loaded = load_global_model(tmp_path)
    assert loaded_cfg == cfg and not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
