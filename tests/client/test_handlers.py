"""The hospital's evaluate handler on a real site: another hospital's model (cross-site
evaluation) is audited by name and never shown as the global model's metrics."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, RecordDict
from prometheus_client import REGISTRY

from medfed.client.app import app
from medfed.shared_models.audit import AUDIT_ENV, read_audit
from medfed.shared_models.protocol import Config, NodeConfig, Record, SiteKey
from medfed.shared_models.tasks import TASKS
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.conftest import tiny_config

CFG = tiny_config(task="classification")


def _evaluate(ctx: Context, config: dict, arrays: dict[str, np.ndarray]) -> dict:
    reply = app(incoming("evaluate", {Config.SERVER_ROUND: 2, **config}, arrays), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {
        "site": reply.content[Record.SITE][SiteKey.NAME],
        **dict(reply.content[Record.METRICS]),
    }


def test_another_sites_model_is_audited_by_name_and_leaves_the_sites_gauge(
    cls_sites, tmp_path, monkeypatch
):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    node = {
        NodeConfig.DATA_PATH: str(cls_sites / "site-0"),
        NodeConfig.CACHE_DIR: str(tmp_path / "cache"),
        NodeConfig.MIN_COUNT: 1,
    }
    ctx = Context(RUN_ID, 5, node, RecordDict(), CFG.to_mapping())
    torch.manual_seed(0)
    global_model = {
        k: v.numpy() for k, v in TASKS["classification"].build_network(CFG).state_dict().items()
    }
    local_model = {k: v + 0.5 if v.dtype == np.float32 else v for k, v in global_model.items()}

    def gauge(site: str) -> float | None:
        labels = {"site": site, "task": "classification", "metric": "loss"}
        return REGISTRY.get_sample_value("medfed_site_local_validation_metric", labels)

    other = _evaluate(ctx, {Config.CROSS_SITE_MODEL: "site-1"}, local_model)
    site = other["site"]
    assert gauge(site) is None, "another site's model is not the global model"
    own = _evaluate(ctx, {}, global_model)
    assert gauge(site) == own["loss"] != other["loss"]
    evaluated = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "round-evaluated"]
    assert [e.get("model") for e in evaluated] == ["site-1", None]
    assert all(e["round"] == 2 and e["site"] == site for e in evaluated)
