"""Differential privacy: noise of the configured scale, clipping, epsilon accounting."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed.client.training import clip_update
from medfed.server.strategies import WEIGHT_KEY, build_strategy
from medfed.shared_models.config import ConfigError, RunConfig

PARAMS = 200_000


class Nodes:
    """The part of a Grid that Flower's sampler uses."""

    def __init__(self, count: int) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 3, 1, 1
        self.ids = list(range(100, 100 + count))

    def get_node_ids(self):
        return self.ids


def dp_config(**values) -> RunConfig:
    return RunConfig.from_mapping({"dp.mode": "client", "min-nodes": 2, **values})


def one_round(federation, server_round: int, start: np.ndarray, updates: list[np.ndarray]):
    arrays = ArrayRecord({"w": Array(start)})
    messages = list(
        federation.strategy.configure_train(
            server_round, arrays, ConfigRecord(), Nodes(len(updates))
        )
    )
    replies = [
        Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(start + update)}),
                    "metrics": MetricRecord({WEIGHT_KEY: 1.0, "num-examples": 10}),
                }
            ),
            reply_to=message,
        )
        for message, update in zip(messages, updates, strict=True)
    ]
    aggregated, _ = federation.strategy.aggregate_train(server_round, replies)
    return aggregated["w"].numpy(), messages


@pytest.mark.parametrize(("multiplier", "norm", "hospitals"), [(1.0, 1.0, 4), (0.5, 2.0, 3)])
def test_noise_of_the_configured_scale_is_added(multiplier, norm, hospitals):
    cfg = dp_config(**{"dp.noise-multiplier": multiplier, "dp.clipping-norm": norm})
    federation = build_strategy(cfg, hospitals)
    start = np.zeros(PARAMS, np.float32)
    result, messages = one_round(federation, 1, start, [np.zeros(PARAMS, np.float32)] * hospitals)
    assert messages[0].content["config"]["clipping_norm"] == norm  # hospitals clip to it
    expected = multiplier * norm / hospitals
    assert abs(result.std() / expected - 1) < 0.02
    assert abs(result.mean()) < 5 * expected / np.sqrt(PARAMS)


def test_epsilon_is_reported_and_grows_with_rounds():
    federation = build_strategy(dp_config(), 3)
    assert federation.accounted and federation.epsilon() is None
    start = np.zeros(1000, np.float32)
    spent = []
    for server_round in (1, 2, 3):
        one_round(federation, server_round, start, [np.zeros(1000, np.float32)] * 3)
        spent.append(federation.epsilon())
    assert 0 < spent[0] < spent[1] < spent[2]
    quieter = build_strategy(dp_config(**{"dp.noise-multiplier": 4.0}), 3)
    one_round(quieter, 1, start, [np.zeros(1000, np.float32)] * 3)
    assert quieter.epsilon() < spent[0]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"dp.adaptive": True}, "adaptive clipping"),
        ({"strategy": "fedadam"}, "FedAvg-style aggregation only"),
        ({"dp.noise-multiplier": 0.0}, "no noise"),
    ],
)
def test_runs_outside_the_accountants_constraints_say_so(values, reason):
    federation = build_strategy(dp_config(**values), 3)
    assert not federation.accounted
    assert reason in federation.unaccounted_reason
    assert federation.epsilon() is None


def test_hospitals_clip_their_update_before_anything_else():
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(50,)).astype(np.float32)}
    big = {"a": start["a"] + 10 * rng.normal(size=(50,)).astype(np.float32)}
    assert clip_update(start, big, 1.5, adaptive=True)
    assert np.linalg.norm(big["a"] - start["a"]) == pytest.approx(1.5, rel=1e-4)
    assert big["a"].dtype == np.float32
    small = {"a": start["a"] + np.float32(1e-3)}
    expected = small["a"].copy()
    assert not clip_update(start, small, 1.5, adaptive=True)
    assert np.allclose(small["a"], expected)


def test_server_side_clipping_bounds_each_update():
    cfg = RunConfig.from_mapping(
        {"dp.mode": "server", "dp.noise-multiplier": 0.0, "dp.clipping-norm": 0.5}
    )
    federation = build_strategy(cfg, 2)
    start = np.zeros(100, np.float32)
    result, _ = one_round(federation, 1, start, [np.full(100, 3.0, np.float32)] * 2)
    assert np.linalg.norm(result) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secure-aggregation": True, "strategy": "krum"}, "'strategy' = 'krum'"),
        ({"secure-aggregation": True, "strategy": "fedmedian"}, "weighted-mean strategy"),
        ({"secure-aggregation": True, "dp.mode": "server"}, "'dp.mode' = 'server'"),
        ({"dp.mode": "central"}, "'dp.mode' = 'central'"),
        ({"dp.mode": "client", "strategy": "fedtrimmedavg"}, "'dp.mode'"),
        ({"dp.clipping-norm": 0.0}, "'dp.clipping-norm'"),
        ({"dp.delta": 1.0}, "'dp.delta'"),
        ({"secagg-clipping-range": -1.0}, "'secagg-clipping-range'"),
        ({"secagg-quantization-bits": 32}, "'secagg-quantization-bits'"),
        ({"secagg-threshold": 1}, "'secagg-threshold'"),
        ({"dp.epsilon": 1.0}, "unknown config key 'dp.epsilon'"),
    ],
)
def test_privacy_settings_are_validated(values, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        RunConfig.from_mapping(values)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"]
)
def test_weighted_mean_strategies_step_the_same_from_the_secure_mean(name):
    """The secure round hands every survivor's reply the same (mean) arrays: each
    strategy must produce what it produces from the individual updates."""
    cfg = RunConfig.from_mapping({"strategy": name, "secure-aggregation": True})
    start = np.zeros(10, np.float32)
    mean = np.linspace(-1, 1, 10).astype(np.float32)
    spread = np.random.default_rng(1).normal(size=10).astype(np.float32)
    individual = [mean + spread, mean - spread, mean]
    from_secure_mean, _ = one_round(build_strategy(cfg, 3), 1, start, [mean] * 3)
    from_individual, _ = one_round(build_strategy(cfg, 3), 1, start, individual)
    assert np.allclose(from_secure_mean, from_individual, atol=1e-6)
