"""A bundle run's messages through the hospital's real ClientApp: the node checks the
coordinator's hash of the bundle configs before running any of them, then replies as for
every task (arrays of the bundle's network, metrics under medfed's keys, counts floored)."""

from __future__ import annotations

import json

import torch
from flwr.app import Context, RecordDict

from medfed.client import approval
from medfed.client.app import app
from medfed.client.approval import STATE_ENV
from medfed.client.bundle_data import bundle_datalist
from medfed.server.cli import main
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.config import RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.protocol import Config, ErrorCode, Metric, NodeConfig, Record, Statistic
from medfed.shared_models.weights import exchanged_arrays
from tests.bundles import write_bundle
from tests.client.test_privacy_mods import RUN_ID, incoming


def _node(site, bundle_root) -> Context:
    cfg = RunConfig.from_mapping(
        {"task": "bundle", "bundle": str(bundle_root), "local-epochs": 1, "stats-min-count": 1}
    )
    node_config = {NodeConfig.DATA_PATH: str(site), NodeConfig.MIN_COUNT: 1}
    return Context(RUN_ID, 5, node_config, RecordDict(), cfg.to_mapping())


def _send(kind, ctx, bundle_root, config):
    torch.manual_seed(0)
    arrays = dict(exchanged_arrays(Bundle(bundle_root).network()))
    return app(incoming(kind, {Config.SERVER_ROUND: 1, **config}, arrays), ctx), arrays


def test_a_node_trains_and_evaluates_the_bundle_it_shares_with_the_coordinator(
    seg_sites, tmp_path, monkeypatch
):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    root = write_bundle(tmp_path / "bundle")
    ctx = _node(seg_sites / "site-1", root)
    expected = {Config.BUNDLE_SHA256: Bundle(root).sha256}
    trained, sent = _send("train", ctx, root, expected)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    assert list(trained.content[Record.ARRAYS]) == list(sent)
    metrics = trained.content[Record.METRICS]
    assert metrics[Metric.TRAIN_LOSS] > 0
    trained_examples = metrics[Metric.NUM_EXAMPLES]
    assert trained.content[Record.SITE]["name"] == "site-1"

    evaluated, _ = _send("evaluate", ctx, root, expected)
    assert not evaluated.has_error()
    metrics = evaluated.content[Record.METRICS]
    assert metrics[Metric.KEY_METRIC] == metrics["val-mean-dice"]
    assert metrics[Metric.WEIGHT] == metrics[Metric.NUM_EXAMPLES] >= 1

    summary = app(incoming("query", {Config.STATS_MIN_COUNT: 1}), ctx)
    counts = summary.content[Record.METRICS]
    data = bundle_datalist(seg_sites / "site-1", RunConfig.from_mapping(ctx.run_config))
    assert counts[Statistic.NUM_TRAIN] == len(data.train) == trained_examples
    assert Statistic.INTENSITY_HISTOGRAM not in counts  # the bundle reads the images, not medfed


def test_a_node_whose_bundle_configs_differ_refuses_to_run_them(seg_sites, tmp_path, monkeypatch):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    root = write_bundle(tmp_path / "bundle")
    coordinators = Bundle(write_bundle(tmp_path / "theirs", lr=0.5)).sha256
    ctx = _node(seg_sites / "site-0", root)
    for kind in ("train", "evaluate"):
        reply, _ = _send(kind, ctx, root, {Config.BUNDLE_SHA256: coordinators})
        assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
        assert "bundle configs hash to" in reply.error.reason
        assert coordinators[:16] in reply.error.reason
    reply, _ = _send("train", ctx, root, {})  # the run's own settings are checked first
    assert reply.has_error() and reply.error.code == ErrorCode.ROUND_REFUSED
    assert f"lacks '{Config.BUNDLE_SHA256}'" in reply.error.reason
    reply, _ = _send("evaluate", ctx, root, {})
    assert reply.has_error() and reply.error.code == ErrorCode.MALFORMED_REQUEST
    assert f"'{Config.BUNDLE_SHA256}' = None" in reply.error.reason


def test_a_deployed_node_runs_only_a_bundle_its_hospital_approved(seg_sites, tmp_path, monkeypatch):
    state = tmp_path / "node-state"
    monkeypatch.setenv(STATE_ENV, str(state))
    monkeypatch.setenv(AUDIT_ENV, str(state / "audit.jsonl"))
    root = write_bundle(tmp_path / "bundle")
    marker = tmp_path / "ran"
    (root / "scripts").mkdir(exist_ok=True)  # the bundle's own code leaves a trace if it runs
    (root / "scripts" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    digest = Bundle(root).sha256
    ctx = _node(seg_sites / "site-0", root)
    for kind in ("train", "evaluate"):
        reply, _ = _send(kind, ctx, root, {Config.BUNDLE_SHA256: digest})
        assert reply.has_error() and reply.error.code == ErrorCode.CONFIG
        assert f"MONAI bundle sha256 {digest} is not approved" in reply.error.reason
    assert not marker.exists()
    events = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [e["bundle_sha256"] for e in events if e["event"] == "bundle-refused"] == [digest] * 2

    approval.approve(state, digest, note="read configs/ and scripts/")
    ctx = _node(seg_sites / "site-0", root)  # the refused run failed: the operator starts anew
    ctx.run_id = RUN_ID + 1
    reply, _ = _send("train", ctx, root, {Config.BUNDLE_SHA256: digest})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


def test_node_inspect_shows_a_bundles_hash_and_what_it_covers(tmp_path, capsys):
    root = write_bundle(tmp_path / "bundle")
    digest = Bundle(root).sha256
    state = tmp_path / "node-state"
    assert main(["node", "inspect", str(root), "--state", str(state)]) == 0
    shown = capsys.readouterr().out
    assert f"MONAI bundle sha256 {digest} (NOT approved" in shown
    assert "configs/train.json" in shown
    assert f"medfed node approve {digest}" in shown
    approval.approve(state, digest)
    assert main(["node", "inspect", str(root), "--state", str(state)]) == 0
    assert f"{digest} (approved" in capsys.readouterr().out
