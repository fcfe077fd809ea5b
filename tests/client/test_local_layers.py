"""FedBN at the hospital: normalisation layers never leave the site, and each site keeps
its own across rounds, in the node's state and, for a restarted node, on its disk."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, RecordDict

from medfed.client import local_layers
from medfed.client.app import app
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.protocol import Config, NodeConfig, Record
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import exchanged_arrays, norm_keys
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.conftest import tiny_config

# stats-min-count 1: the sites' counts are shown, so their metrics are too
FEDBN = tiny_config(
    task="classification",
    strategy="fedbn",
    norm="batch",
    local_epochs=1,
    min_nodes=1,
    stats_min_count=1,
)


def _node(site, cache, cfg=FEDBN) -> Context:
    node_config = {
        NodeConfig.DATA_PATH: str(site),
        NodeConfig.CACHE_DIR: str(cache),
        NodeConfig.MIN_COUNT: 1,
    }
    return Context(RUN_ID, 5, node_config, RecordDict(), cfg.to_mapping())


def _global(cfg=FEDBN) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return dict(exchanged_arrays(TASKS[cfg.task].build_network(cfg), cfg.keeps_norms_local))


def _round(ctx: Context, server_round: int, kind: str = "train"):
    """One message of `server_round`; a training round's global model moved a little each
    round, as aggregation moves it (a hospital trains on a global model once)."""
    model = _global()
    if kind == "train":
        model = {k: v + np.float32(1e-3 * server_round) for k, v in model.items()}
    reply = app(incoming(kind, {Config.SERVER_ROUND: server_round}, model), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


def test_fedbn_sends_no_normalisation_layer(cls_sites, tmp_path, monkeypatch):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    net = TASKS["classification"].build_network(FEDBN)
    local = set(norm_keys(net))
    assert any(k.endswith("running_mean") for k in local)  # batch norm: there is something
    reply = _round(_node(cls_sites / "site-0", tmp_path / "cache"), 1)
    sent = set(reply.content[Record.ARRAYS])
    assert sent and not sent & local
    assert sent == set(_global())


def test_each_site_keeps_its_own_layers_across_rounds_and_restarts(
    cls_sites, tmp_path, monkeypatch
):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    kept = {}
    for site in ("site-0", "site-1"):
        ctx = _node(cls_sites / site, tmp_path / site)
        _round(ctx, 1)
        first = ctx.state.array_records[local_layers.STATE_KEY].to_torch_state_dict()
        _round(ctx, 2)
        second = ctx.state.array_records[local_layers.STATE_KEY].to_torch_state_dict()
        # the second round started from the first round's statistics, not from scratch
        assert all(int(v) == 2 * int(first[k]) for k, v in second.items() if "num_batches" in k)
        kept[site] = second
        on_disk = torch.load(local_layers.layers_file(tmp_path / site, RUN_ID), weights_only=True)
        assert all(torch.equal(on_disk[k], v) for k, v in second.items())
    means = [k for k in kept["site-0"] if k.endswith("running_mean")]
    assert any(not torch.allclose(kept["site-0"][k], kept["site-1"][k]) for k in means)

    restarted = _node(cls_sites / "site-1", tmp_path / "site-1")  # empty state: a new process
    net = TASKS["classification"].build_network(FEDBN)
    assert local_layers.restore(net, restarted, tmp_path / "site-1")
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept["site-1"].items())


def test_evaluation_uses_the_sites_own_layers(cls_sites, tmp_path, monkeypatch):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    ctx = _node(cls_sites / "site-0", tmp_path / "cache")
    before = _round(ctx, 0, "evaluate").content[Record.METRICS]["loss"]
    _round(ctx, 1)
    # the same global arrays, evaluated with the statistics this site learnt in round 1
    after = _round(ctx, 1, "evaluate").content[Record.METRICS]["loss"]
    assert after != before


def test_unreadable_kept_layers_are_not_used(tmp_path):
    ctx = Context(RUN_ID, 5, {}, RecordDict(), FEDBN.to_mapping())
    path = local_layers.layers_file(tmp_path, RUN_ID)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    net = TASKS["classification"].build_network(FEDBN)
    assert not local_layers.restore(net, ctx, tmp_path)
