"""The hospital's run ledger and its check of every training message against the run's
own settings: what a deviating coordinator can neither reset nor choose per hospital."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn

from medfed.client.app import TRAIN_MODS
from medfed.client.privacy.round_guard import (
    RoundLedger,
    RoundRefused,
    check_training_settings,
    ledger_file,
)
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, Metric, NodeConfig, Record, SiteKey
from tests.in_process_grid import act_as_coordinator

MODEL = {"w": np.zeros(4, np.float32)}


def context(tmp_path=None, **run) -> Context:
    """A hospital's context for run 7; with `tmp_path`, a deployed node's cache folder."""
    node = {NodeConfig.MIN_COUNT: 1}
    if tmp_path is not None:
        node[NodeConfig.CACHE_DIR] = str(tmp_path / "cache")
    return Context(7, 5, node, RecordDict(), RunConfig.from_mapping(run).to_mapping())


def training(server_round: int, model=MODEL, **settings) -> Message:
    act_as_coordinator()
    content = RecordDict(
        {
            Record.ARRAYS: ArrayRecord({k: Array(v) for k, v in model.items()}),
            Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: server_round, **settings}),
        }
    )
    message = Message(content=content, dst_node_id=5, message_type="train")
    message.metadata.__dict__["_message_id"] = str(uuid4())
    return message


def _trained(msg: Message, ctx: Context) -> Message:
    """Stands in for the train handler: the received arrays back, with the usual metrics."""
    metrics = {Metric.WEIGHT: 10.0, Metric.NUM_EXAMPLES: 10, Metric.SKIPPED_FILES: 0}
    content = RecordDict(
        {
            Record.ARRAYS: msg.content[Record.ARRAYS],
            Record.METRICS: MetricRecord(metrics),
            Record.SITE: ConfigRecord({SiteKey.NAME: "site-a"}),
        }
    )
    return Message(content=content, reply_to=msg)


TRAIN = make_ffn(_trained, TRAIN_MODS)


def test_a_plain_run_trains_each_round_once_on_each_model():
    """The ledger holds in plain runs too: rounds only move forward, a model once."""
    ctx = context()
    assert not TRAIN(training(1), ctx).has_error()
    with pytest.raises(RoundRefused, match="round 1 is not after round 1"):
        TRAIN(training(1, {"w": np.ones(4, np.float32)}), ctx)
    with pytest.raises(RoundRefused, match="already trained on"):
        TRAIN(training(2), ctx)
    assert not TRAIN(training(3, {"w": np.ones(4, np.float32)}), ctx).has_error()


def test_the_ledger_survives_a_node_restart(tmp_path):
    """A deployed node keeps the ledger in a file under its cache folder: a restarted node
    (an empty state) still refuses a round and a model it trained on."""
    before = context(tmp_path)
    RoundLedger(before).begin_training(4, b"\x01" * 32)
    assert ledger_file(before).is_file()
    restarted = context(tmp_path)
    assert not restarted.state.config_records
    with pytest.raises(RoundRefused, match="round 4 is not after round 4"):
        RoundLedger(restarted).require_ahead(4)
    with pytest.raises(RoundRefused, match="already trained on"):
        RoundLedger(restarted).begin_training(5, b"\x01" * 32)
    RoundLedger(restarted).begin_training(5, b"\x02" * 32)


def test_a_ledger_that_cannot_be_read_trains_nothing(tmp_path):
    ctx = context(tmp_path)
    path = ledger_file(ctx)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(RoundRefused, match="cannot be read") as refused:
        RoundLedger(ctx).require_ahead(1)
    assert str(tmp_path) not in str(refused.value)  # the path stays in the node's log


@pytest.mark.parametrize(
    ("run", "settings", "refusal"),
    [
        ({"strategy": "fedprox", "proximal-mu": 0.01}, {"proximal-mu": 0.5}, "says 0.01"),
        ({"strategy": "fedprox"}, {"proximal-mu": float("nan")}, "'proximal-mu' = nan"),
        ({"strategy": "fedprox"}, {}, "lacks 'proximal-mu'"),
        ({}, {"proximal-mu": 0.01}, "sets 'proximal-mu'"),
        ({}, {"clipping_norm": 1.0}, "sets 'clipping_norm'"),
        ({"dp.mode": "server"}, {"clipping_norm": 1.0}, "sets 'clipping_norm'"),
        ({"dp.mode": "client"}, {}, "lacks 'clipping_norm'"),
        ({"dp.mode": "client", "dp.clipping-norm": 1.0}, {"clipping_norm": 2.0}, "says 1.0"),
        ({"dp.mode": "client", "dp.adaptive": True}, {"clipping_norm": -1.0}, "expected a"),
        ({}, {"lr": 10.0}, "sets 'lr'"),
        ({}, {"bundle-sha256": "ab" * 32}, "sets 'bundle-sha256'"),
    ],
)
def test_a_setting_that_is_not_the_runs_own_is_refused(run, settings, refusal):
    cfg = RunConfig.from_mapping(run)
    with pytest.raises(RoundRefused, match=refusal):
        check_training_settings({Config.SERVER_ROUND: 1, **settings}, cfg)


@pytest.mark.parametrize(
    ("run", "settings"),
    [
        ({}, {}),
        ({"strategy": "fedprox", "proximal-mu": 0.25}, {"proximal-mu": 0.25}),
        ({"dp.mode": "client", "dp.clipping-norm": 0.5}, {"clipping_norm": 0.5}),
        ({"dp.mode": "client", "dp.adaptive": True}, {"clipping_norm": 0.37}),  # the round's
        ({"task": "bundle", "bundle": "/b"}, {"bundle-sha256": "ab" * 32}),
    ],
)
def test_the_runs_own_settings_are_accepted(run, settings):
    cfg = RunConfig.from_mapping(run)
    assert check_training_settings({Config.SERVER_ROUND: 3, **settings}, cfg) == 3


def test_a_hospital_that_requires_secure_aggregation_never_trains_in_the_clear():
    """The run config is the operator's: a hospital's own node setting decides whether its
    update may ever be sent in the clear (a plain run was trained and sent before)."""
    ctx = context()
    ctx.node_config[NodeConfig.REQUIRE_SECURE_AGGREGATION] = True
    with pytest.raises(RoundRefused, match="trains only in runs with secure aggregation"):
        TRAIN(training(1), ctx)
    secure = context(**{"secure-aggregation": True})
    secure.node_config[NodeConfig.REQUIRE_SECURE_AGGREGATION] = True
    with pytest.raises(Exception, match="carries no neighbour shares"):  # past the policy
        TRAIN(training(1), secure)
