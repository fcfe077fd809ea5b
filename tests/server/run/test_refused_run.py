"""A run config the coordinator cannot run: one line naming the key, an audit entry and,
on a medfed coordinator, a failed run folder (`flwr run` itself exits 0 whatever the
ServerApp did, and used to leave no trace of the run)."""

from __future__ import annotations

import json
import re

import pytest
from flwr.app import Context, RecordDict

from medfed.server.run import federated_run
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.config import ConfigError
from medfed.shared_models.run_folder import RUNS_DIR_ENV
from tests.audit_log import read_audit


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"num-server-rounds": -1}, "num-server-rounds"),
        ({"local-epoch": 1}, "unknown config key 'local-epoch' (did you mean 'local-epochs'?"),
    ],
)
def test_a_refused_run_config_leaves_a_failed_run_folder_and_an_audit_line(
    tmp_path, monkeypatch, caplog, run_config, named
):
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    context = Context(42, 1, {}, RecordDict(), run_config)
    with pytest.raises(ConfigError, match=re.escape(named)):
        federated_run.run(grid=None, context=context)  # the grid is never reached
    metrics = json.loads((tmp_path / "runs" / "42" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and named in metrics["error"]
    assert metrics["config"] == run_config  # as received
    (entry,) = read_audit(tmp_path / "audit.jsonl")
    assert entry["event"] == "run-finished" and entry["status"] == "failed"
    assert named in entry["error"]
    assert "run failed: run config refused: " in caplog.text
