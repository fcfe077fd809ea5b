"""DP noise added by the hospitals inside the masked sum (dp.noise at the hospitals): the sum
carries the run's central noise, the coordinator never holds a noise-free sum, and each
hospital accounts its own epsilon against the coordinator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.client.privacy.hospital_noise import own_epsilon
from medfed.server.secagg.unmasking import SecAggAbort
from medfed.shared_models.protocol import Metric, Record
from tests.in_process_grid import InProcessGrid, secure_config, train_messages
from tests.server.secagg.test_workflow import global_model, run_round, workflow

SIZE = 40_000  # values per update: enough to measure a standard deviation to ~1 %
CLIP, Z = 0.5, 1.0


def clipped(update: np.ndarray) -> np.ndarray:
    return update * min(1.0, CLIP / float(np.linalg.norm(update)))


def hospitals(n: int, seed: int):
    rng = np.random.default_rng(seed)
    nodes = [int(x) for x in rng.choice(2**40, size=n, replace=False) + 1]
    updates = {node: {"w": rng.normal(0, 0.01, SIZE).astype(np.float32)} for node in nodes}
    start = {"w": rng.normal(0, 1, SIZE).astype(np.float32)}
    cfg = secure_config(**{"dp.mode": "client", "dp.clipping-norm": CLIP})
    assert cfg.noise_at_hospitals  # dp.noise = auto: the hospitals add it wherever they can
    grid = InProcessGrid(updates, dict.fromkeys(nodes, 1.0), cfg)
    return nodes, updates, start, cfg, grid


def test_the_unmasked_mean_carries_the_runs_noise_and_each_hospital_its_epsilon():
    """Each of n hospitals adds N(0, (z C)^2 / n): the mean of the sum is off the mean of
    the clipped updates by noise of std z C / n, what the coordinator would have added."""
    nodes, updates, start, cfg, grid = hospitals(3, seed=51)
    outcome = run_round(grid, start, cfg)
    expected = np.mean([clipped(updates[n]["w"]) for n in nodes], axis=0)
    noise = outcome.mean_update["w"] - expected
    assert noise.std() == pytest.approx(Z * CLIP / 3, rel=0.03)
    assert abs(noise.mean()) < 5 * Z * CLIP / 3 / math.sqrt(SIZE)
    own = own_epsilon([Z / math.sqrt(3)], cfg.dp_delta)
    for reply in outcome.replies:
        assert reply.content[Record.METRICS][Metric.DP_EPSILON_OWN] == pytest.approx(own)


def test_a_difference_of_two_sums_carries_noise():
    """The differencing attack: round 1 over {V, A, B, C}, round 2 over {A, B, C} (the
    model moved a little, so nobody trains twice on one). 4 m1 - 3 m2 is V's update plus
    the noise of both sums, std sqrt(2) z C: never V's update in the clear."""
    nodes, updates, start, cfg, grid = hospitals(4, seed=52)
    secure = workflow(grid, cfg)
    first = run_round(grid, start, cfg, secure, server_round=1)
    template = {k: v.shape for k, v in start.items()}
    without_victim = train_messages(nodes[1:], global_model(start, 2), 2, cfg)
    second = secure.train_round(2, without_victim, template)
    assert len(second.replies) == 3
    victim = clipped(updates[nodes[0]]["w"])
    estimate = 4 * first.mean_update["w"] - 3 * second.mean_update["w"]
    assert (estimate - victim).std() == pytest.approx(math.sqrt(2) * Z * CLIP, rel=0.03)


def test_a_hospital_lost_after_sharing_aborts_the_round():
    """Its share of the noise would be missing from the sum: the release would carry less
    noise than the run promises, so the round is given up before any share is asked."""
    nodes, _, start, cfg, grid = hospitals(4, seed=53)
    grid.drop["upload"] = {nodes[1]}
    with pytest.raises(SecAggAbort, match="each carries a share of the DP noise"):
        run_round(grid, start, cfg)
    assert not [m for m in grid.pushed if m.metadata.message_type == "train.secagg_unmask"]
