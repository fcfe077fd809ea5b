"""Strategies: DP noise of the configured scale, epsilon accounting, the secure mean used once."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed.server.run.strategies import FLOWER_STRATEGIES, build_strategy
from medfed.shared_models.config import STRATEGIES, RunConfig
from medfed.shared_models.protocol import Metric

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


def one_round(
    federation, server_round: int, start: np.ndarray, updates: list[np.ndarray], losses=None
):
    arrays = ArrayRecord({"w": Array(start)})
    messages = list(
        federation.flower.configure_train(server_round, arrays, ConfigRecord(), Nodes(len(updates)))
    )
    replies = [
        Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(start + update)}),
                    "metrics": MetricRecord(
                        {Metric.WEIGHT: 1.0, "num-examples": 10, Metric.TRAIN_LOSS: loss}
                    ),
                }
            ),
            reply_to=message,
        )
        for message, update, loss in zip(
            messages, updates, losses or [1.0] * len(updates), strict=True
        )
    ]
    aggregated, metrics = federation.flower.aggregate_train(server_round, replies)
    return aggregated["w"].numpy(), messages, metrics


@pytest.mark.parametrize(("multiplier", "norm", "hospitals"), [(1.0, 1.0, 4), (0.5, 2.0, 3)])
def test_noise_of_the_configured_scale_is_added(multiplier, norm, hospitals):
    cfg = dp_config(**{"dp.noise-multiplier": multiplier, "dp.clipping-norm": norm})
    federation = build_strategy(cfg, hospitals)
    start = np.zeros(PARAMS, np.float32)
    result, messages, _ = one_round(
        federation, 1, start, [np.zeros(PARAMS, np.float32)] * hospitals
    )
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


def test_server_side_clipping_bounds_each_update():
    cfg = RunConfig.from_mapping(
        {"dp.mode": "server", "dp.noise-multiplier": 0.0, "dp.clipping-norm": 0.5}
    )
    federation = build_strategy(cfg, 2)
    start = np.zeros(100, np.float32)
    result, _, _ = one_round(federation, 1, start, [np.full(100, 3.0, np.float32)] * 2)
    assert np.linalg.norm(result) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"]
)
def test_weighted_mean_strategies_step_the_same_from_the_secure_mean(name):
    """The secure round hands every survivor's reply the same (mean) arrays: each
    strategy must produce what it produces from the individual updates."""
    secure = RunConfig.from_mapping({"strategy": name, "secure-aggregation": True})
    plain = RunConfig.from_mapping({"strategy": name})
    start = np.zeros(10, np.float32)
    mean = np.linspace(-1, 1, 10).astype(np.float32)
    spread = np.random.default_rng(1).normal(size=10).astype(np.float32)
    individual = [mean + spread, mean - spread, mean]
    from_secure_mean, *_ = one_round(build_strategy(secure, 3), 1, start, [mean] * 3)
    from_individual, *_ = one_round(build_strategy(plain, 3), 1, start, individual)
    assert np.allclose(from_secure_mean, from_individual, atol=1e-6)


def test_the_secure_mean_is_used_as_it_is_not_averaged_again():
    """Under secure aggregation the replies carry the unmasked mean: the strategy takes it
    from one reply (differing copies would be averaged if it computed the mean again),
    while the clear training metrics are still aggregated over every survivor."""
    secure = RunConfig.from_mapping({"secure-aggregation": True})
    start = np.zeros(4, np.float32)
    first, other = np.full(4, 1.0, np.float32), np.full(4, 3.0, np.float32)
    result, _, metrics = one_round(
        build_strategy(secure, 2), 1, start, [first, other], losses=[1.0, 3.0]
    )
    assert np.array_equal(result, first)
    assert metrics[Metric.TRAIN_LOSS] == pytest.approx(2.0)


def test_every_configurable_strategy_is_a_flower_strategy():
    assert tuple(FLOWER_STRATEGIES) == STRATEGIES


@pytest.mark.parametrize(("noise", "expected_noise"), [("coordinator", 1.0 / 3), ("auto", 0.0)])
def test_secure_aggregation_with_accounted_dp_keeps_flowers_accountant(noise, expected_noise):
    """Flower's accountant accepts only FedAvg's own aggregation: a secure, accounted run
    averages the identical copies of the mean, which gives back the mean, with epsilon.
    The coordinator adds the noise (std z C / n) unless the hospitals put it in the sum
    (dp.noise auto: the unmasked mean already carries it, nothing is added twice)."""
    secure = {"secure-aggregation": True, "dp.noise": noise}
    cfg = dp_config(**secure, **{"dp.noise-multiplier": 0.0})
    assert not build_strategy(cfg, 3).accounted
    federation = build_strategy(dp_config(**secure), 3)
    assert federation.accounted
    start = np.zeros(PARAMS, np.float32)
    mean = np.full(PARAMS, 0.25, np.float32)
    result, _, _ = one_round(federation, 1, start, [mean] * 3)
    assert (result - mean).std() == pytest.approx(expected_noise, rel=0.02, abs=1e-7)
    assert federation.epsilon() > 0


def test_two_coordinators_with_the_same_seed_draw_different_noise():
    """Flower drew DP noise from NumPy's global generator, seeded with the run's public
    `seed`: regenerating the draws gave the noise-free aggregate. Two runs seeded alike
    now add noise that differs, and NumPy's seed does not decide it."""
    mean = np.full(PARAMS, 0.25, np.float32)
    released = []
    for _ in range(2):
        np.random.seed(0)  # what federated_run does with the default seed
        federation = build_strategy(dp_config(), 3)
        result, _, _ = one_round(federation, 1, np.zeros(PARAMS, np.float32), [mean] * 3)
        released.append(result - mean)
    assert released[0].std() == pytest.approx(1.0 / 3, rel=0.02)
    assert not np.allclose(released[0], released[1])
    np.random.seed(0)
    assert abs(np.corrcoef(released[0], np.random.normal(0, 1, PARAMS))[0, 1]) < 0.02


@pytest.mark.parametrize(
    ("name", "attribute", "default"),
    [("fedadam", "eta", 0.1), ("fedyogi", "eta", 0.01), ("fedavgm", "server_learning_rate", 1.0)],
)
def test_server_lr_sets_the_strategys_own_step(name, attribute, default):
    flower = build_strategy(RunConfig.from_mapping({"strategy": name}), 3).flower
    assert getattr(flower, attribute) == default  # 0: Flower's default stands
    tuned = RunConfig.from_mapping({"strategy": name, "server-lr": 0.003})
    assert getattr(build_strategy(tuned, 3).flower, attribute) == 0.003
