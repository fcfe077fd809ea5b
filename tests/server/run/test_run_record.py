"""The run folder on disk: status, rounds, checkpoints and the final model, written atomically."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from medfed.server.run import run_status
from medfed.server.run.run_record import RunAbandoned, RunRecord
from medfed.shared_models import processes
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
    digest = record.checkpoint(3, arrays)
    path = tmp_path / "checkpoints" / "round-003.pt"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 3 and saved["config"] == cfg.to_mapping()
    assert torch.equal(saved["arrays"]["w"], torch.arange(6, dtype=torch.float32))
    digest = record.save_model(net, cfg, 3)
    assert digest == hashlib.sha256((tmp_path / "global_model.pt").read_bytes()).hexdigest()
    loaded_cfg, loaded = load_global_model(tmp_path)
    assert loaded_cfg == cfg and not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


ROUND_0 = {
    "round": 0,
    "seconds": 0.1,
    "global": {"auc": 0.5},
    "sites": {},
    "replied": ["site-0"],
    "failed": [],
    "failures": {},
}


WRITER = """
import sys, time
from pathlib import Path
from medfed.server.run.run_record import RunRecord
from medfed.shared_models.config import RunConfig
record = RunRecord(RunConfig.from_mapping({"task": "classification"}), Path(sys.argv[1]))
record.add_round(dict(eval(sys.argv[2])))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_run_whose_writer_was_killed_is_closed_once_with_its_history(tmp_path):
    """The writer holds the folder's lock while it lives, in whatever pid namespace; the
    kernel releases it when the process is SIGKILLed."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), repr(ROUND_0)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert not run_status.close(tmp_path, "failed", run_status.DIED), "its writer lives"
        assert not run_status.is_orphaned(tmp_path)
    finally:
        writer.kill()
        writer.wait()
    assert run_status.is_orphaned(tmp_path)
    assert run_status.close(tmp_path, "failed", run_status.DIED)
    closed = json.loads((tmp_path / "metrics.json").read_text())
    assert closed["status"] == "failed" and "ServerApp process ended" in closed["error"]
    assert closed["rounds"] == [ROUND_0]
    assert (tmp_path / "report.md").is_file()
    assert not run_status.close(tmp_path, "interrupted", "again"), "closed once only"


def test_a_writer_never_overwrites_a_verdict_someone_else_recorded(tmp_path):
    record = RunRecord(tiny_config(task="classification"), tmp_path)
    record.add_round(ROUND_0)
    data = json.loads((tmp_path / "metrics.json").read_text())
    data.update(status="interrupted", error="stopped by SIGTERM")
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(RunAbandoned, match="says interrupted"):
        record.add_round(ROUND_0 | {"round": 1})
    after = json.loads((tmp_path / "metrics.json").read_text())
    assert after["status"] == "interrupted" and len(after["rounds"]) == 1


def test_a_folder_without_a_writer_lock_falls_back_on_the_recorded_process(tmp_path):
    """Runs written by an older medfed: closed only when this machine can tell."""
    for name, process in (("alive", processes.identity()), ("dead", _dead_identity()),
                          ("elsewhere", processes.identity() | {"host": "other"})):  # fmt: skip
        (tmp_path / name).mkdir()
        record = {"status": "running", "process": process, "rounds": [ROUND_0],
                  "config": tiny_config(task="classification").to_mapping()}  # fmt: skip
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    closed = run_status.close_orphaned(sorted(tmp_path.iterdir()), "failed", "gone", None)
    assert closed == [tmp_path / "dead"]


def test_a_recorded_process_is_dead_only_when_this_machine_can_tell():
    me = processes.identity()
    assert processes.liveness(me) == "alive"
    assert processes.liveness(me | {"start": me["start"] + 1}) == "dead", "a reused pid"
    assert processes.liveness(me | {"boot": "another-boot"}) == "dead", "after a reboot"
    # another container or machine sees other pids: never closed on a guess
    assert processes.liveness(me | {"pid": 999_999, "namespace": "pid:[1]"}) == "unknown"
    assert processes.liveness(me | {"pid": 999_999, "host": "elsewhere"}) == "unknown"
    for broken in ({}, "x", None, {"pid": "7"}, [1, 2]):
        assert processes.liveness(broken) == "unknown"


@pytest.mark.parametrize("process", ["x", None, [1], {"pid": "12"}])
def test_a_malformed_record_never_blocks_closing_the_others(tmp_path, process):
    for name, value in (("1", process), ("2", _dead_identity())):
        (tmp_path / name).mkdir()
        record = {"status": "running", "process": value, "rounds": [],
                  "config": tiny_config(task="classification").to_mapping()}  # fmt: skip
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "metrics.json").write_text("[not a record")
    closed = run_status.close_orphaned(sorted(tmp_path.iterdir()), "failed", "gone", None)
    assert closed == [tmp_path / "2"]
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["status"] == "running"


def _dead_identity() -> dict:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return processes.identity() | {"pid": int(dead.stdout)}
