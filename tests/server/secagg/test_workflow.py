"""The coordinator's SecAgg+ workflow against real hospital code: correctness, dropouts,
and what the coordinator can and cannot see."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from medfed.server.run.exchange import Exchange
from medfed.server.run.replies import ReplyCollector, SiteNames
from medfed.server.secagg.unmasking import SecAggAbort, plan_round
from medfed.server.secagg.workflow import SecureAggregation
from medfed.shared_models.secagg.quantize import Encoding, decode, encode, scale, weight_ratio
from tests.in_process_grid import RUN_ID, InProcessGrid, secure_config, train_messages

SHAPES = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "fc.weight": (2, 8)}


def random_updates(n: int, seed: int, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    nodes = [int(x) for x in rng.choice(2**62, size=n, replace=False)]
    updates = {
        node: {k: rng.normal(0, spread, s).astype(np.float32) for k, s in SHAPES.items()}
        for node in nodes
    }
    # example counts up to twice the public maximum weight (1000): some are capped
    weights = {node: float(rng.integers(300, 2000)) for node in nodes}
    start = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}
    return updates, weights, start


def workflow(grid: InProcessGrid, cfg, run_id: int = RUN_ID) -> SecureAggregation:
    replies = ReplyCollector(Exchange(grid, cfg.round_timeout_seconds), SiteNames())
    return SecureAggregation(replies, cfg, run_id)


def global_model(start, server_round: int):
    """The global model of `server_round`: `start`, moved a little each round (as training
    moves it: a hospital trains on a global model once)."""
    return {k: v + np.float32(1e-3 * (server_round - 1)) for k, v in start.items()}


def run_round(grid: InProcessGrid, start, cfg, secure=None, server_round=1):
    """One secure round of `cfg` (which becomes the run's config at every node too)."""
    grid.use_config(cfg)
    secure = secure or workflow(grid, cfg)
    template = {k: v.shape for k, v in start.items()}
    model = global_model(start, server_round)
    messages = train_messages(grid.get_node_ids(), model, server_round, cfg)
    return secure.train_round(server_round, messages, template)


def weighted_mean(updates, weights, nodes, max_weight: float = 1000.0):
    """Each hospital weighted by its own count, capped at the public maximum."""
    own = {n: min(weights[n], max_weight) for n in nodes}
    total = sum(own.values())
    return {
        k: sum(own[n] * updates[n][k].astype(np.float64) for n in nodes) / total for k in SHAPES
    }


def federation(n: int, seed: int):
    """`n` hospitals with random updates, their grid, the config and one run's workflow."""
    updates, weights, start = random_updates(n, seed=seed)
    grid = InProcessGrid(updates, weights)
    cfg = secure_config()
    return updates, weights, start, grid, cfg, workflow(grid, cfg)


def assert_mean_of(outcome, updates, weights, nodes) -> None:
    """The round's unmasked mean is the weighted mean of exactly `nodes`' updates."""
    expected = weighted_mean(updates, weights, nodes)
    for key in SHAPES:
        assert np.abs(outcome.mean_update[key] - expected[key]).max() < 1e-5, key


def tolerance(cfg, participants: int, ratio_sum: float) -> float:
    """Half a quantisation step per participant, relative to the surviving weight."""
    step = scale(cfg.secagg_clipping_range, cfg.secagg_quantization_bits, participants)
    return participants / (step * ratio_sum) + 1e-6


@pytest.mark.parametrize(
    ("n", "threshold", "neighbours"),
    [(3, 0, 0), (3, 3, 0), (5, 0, 0), (5, 4, 0), (8, 0, 4), (8, 5, 0), (8, 3, 2)],
)
def test_unmasked_aggregate_is_the_weighted_mean(n, threshold, neighbours):
    updates, weights, start = random_updates(n, seed=n * 10 + threshold)
    cfg = secure_config(**{"secagg-threshold": threshold, "secagg-neighbours": neighbours})
    outcome = run_round(InProcessGrid(updates, weights), start, cfg)
    assert not outcome.failed
    expected = weighted_mean(updates, weights, list(updates))
    ratio_sum = sum(weight_ratio(w, cfg.secagg_max_weight) for w in weights.values())
    for key in SHAPES:
        error = np.abs(outcome.mean_update[key] - expected[key]).max()
        assert error < tolerance(cfg, n, ratio_sum), (key, error)
    assert set(outcome.stage_seconds) == {"advertise", "share", "upload", "unmask"}


def test_any_allowed_dropout_set_still_yields_the_survivors_mean():
    n, threshold = 5, 3
    updates, weights, start = random_updates(n, seed=1)
    cfg = secure_config(**{"secagg-threshold": threshold})
    nodes = list(updates)
    for size in range(1, n - threshold + 1):
        for dropped in itertools.combinations(nodes, size):
            grid = InProcessGrid(updates, weights)
            grid.drop["upload"] = set(dropped)
            outcome = run_round(grid, start, cfg)
            survivors = [x for x in nodes if x not in dropped]
            assert_mean_of(outcome, updates, weights, survivors)
            assert set(outcome.failed) == set(dropped)


def test_a_hospital_lost_after_uploading_is_still_unmasked():
    updates, weights, start = random_updates(5, seed=2)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.drop["unmask"] = {nodes[0]}
    outcome = run_round(grid, start, secure_config())
    assert_mean_of(outcome, updates, weights, nodes)


def test_too_many_dropouts_abort_the_round_naming_them():
    updates, weights, start = random_updates(5, seed=3)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.drop["upload"] = set(nodes[:3])  # threshold 3 of 5: only 2 left
    with pytest.raises(SecAggAbort, match="upload stage: 2 hospitals left, 3 needed") as err:
        run_round(grid, start, secure_config())
    for node in nodes[:3]:
        assert f"node {node}" in str(err.value)


def test_too_few_unmask_answers_abort_cleanly():
    updates, weights, start = random_updates(5, seed=4)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.drop["unmask"] = set(nodes[:3])
    with pytest.raises(SecAggAbort, match=r"shares of node .* came back; 3 are needed"):
        run_round(grid, start, secure_config())


def test_a_single_masked_upload_is_uniform_mod_2_32():
    updates, weights, start = random_updates(3, seed=5)
    node = next(iter(updates))
    big = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    big["fc.weight"] = np.zeros((64, 1024), np.float32)  # all-zero update: maximally structured
    start = {**start, "fc.weight": np.zeros((64, 1024), np.float32)}
    for n in updates:
        updates[n] = {**updates[n], "fc.weight": big["fc.weight"]}
    grid = InProcessGrid(updates, weights)
    run_round(grid, start, secure_config())
    upload = next(m for m in grid.seen if m.metadata.src_node_id == node and "arrays" in m.content)
    values = upload.content["arrays"]["masked"].numpy()
    assert values.size == sum(int(np.prod(a.shape)) for a in big.values()) + 2  # weight, clipped
    for top_bits in (values >> 24, values & 0xFF):  # high and low bytes
        counts = np.bincount(top_bits.astype(np.int64), minlength=256)
        assert chisquare(counts).pvalue > 1e-4


def test_the_coordinators_view_holds_no_secret_in_the_clear():
    updates, weights, start = random_updates(4, seed=6)
    grid = InProcessGrid(updates, weights)
    grid.drop["upload"] = {next(iter(updates))}  # forces key shares to be revealed too
    run_round(grid, start, secure_config(**{"secagg-threshold": 3}))
    seen = bytearray()
    for reply in grid.seen:
        for record in reply.content.config_records.values():
            for value in record.values():
                seen += value if isinstance(value, bytes) else str(value).encode()
        for record in reply.content.array_records.values():
            for array in record.values():
                seen += array.data
    secrets = [s for node in grid.secrets.values() for s in node]
    # per hospital: 2 keys and a seed; per uploader (3): next round's 2 keys and seed
    assert len(secrets) == 3 * 4 + 3 * 3
    for secret in secrets:
        assert secret not in seen


def test_a_tampered_share_drops_its_receiver_not_the_round():
    updates, weights, start = random_updates(4, seed=8)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.tamper = {(nodes[0], nodes[1])}
    outcome = run_round(grid, start, secure_config())
    assert "failed authentication" in outcome.failed[nodes[0]]
    assert_mean_of(outcome, updates, weights, nodes[1:])


def test_the_plan_validates_threshold_and_neighbourhood():
    nodes = [str(i) for i in range(1, 11)]
    plan = plan_round(nodes, 4, 0)
    assert all(len(v) == 4 for v in plan.neighbours.values())
    assert all(a in plan.neighbours[b] for a in nodes for b in plan.neighbours[a])
    assert plan.threshold == 3
    assert plan_round(nodes, 0, 0).threshold == 6
    with pytest.raises(ValueError, match="secagg-threshold"):
        plan_round(nodes, 4, 2)
    with pytest.raises(ValueError, match="secagg-threshold"):
        plan_round(nodes, 4, 6)


def test_a_non_finite_update_is_refused_at_the_hospital():
    updates, weights, start = random_updates(4, seed=9)
    broken = next(iter(updates))
    updates[broken]["conv.bias"][0] = np.nan
    outcome = run_round(InProcessGrid(updates, weights), start, secure_config())
    assert "NaN or infinite" in outcome.failed[broken]
    assert len(outcome.replies) == 3


def test_a_steady_round_is_prepared_during_the_previous_one():
    updates, weights, start, grid, cfg, secure = federation(4, seed=10)
    nodes = list(updates)
    first = run_round(grid, start, cfg, secure, server_round=1)
    assert set(first.stage_seconds) == {"advertise", "share", "upload", "unmask"}
    second = run_round(grid, start, cfg, secure, server_round=2)
    assert set(second.stage_seconds) == {"upload", "unmask"}  # keys and shares rode along
    assert_mean_of(second, updates, weights, nodes)


@pytest.mark.parametrize("stage", ["upload", "unmask"])
def test_a_round_after_a_dropout_sets_itself_up_again(stage):
    updates, weights, start, grid, cfg, secure = federation(4, seed=12)
    nodes = list(updates)
    grid.drop[stage] = {nodes[0]}
    run_round(grid, start, cfg, secure, server_round=1)
    grid.drop = {}
    second = run_round(grid, start, cfg, secure, server_round=2)
    assert "advertise" in second.stage_seconds and not second.failed
    assert_mean_of(second, updates, weights, nodes)


def test_weighting_cannot_overflow_the_modulus():
    # Extreme counts and values at the clipping bound: the sums still decode.
    ratios = [weight_ratio(count, 1000.0) for count in (1e12, 1.0, 3.0)]
    assert ratios == [1.0, 0.001, 0.003]
    total = np.zeros(102, np.uint32)
    for ratio in ratios:
        encoded, clipped = encode(np.full(100, 1e9, np.float32), ratio, 16.0, 31, 3)
        assert clipped == 100
        total += encoded
    mean, ratio_sum, clipped = decode(total, Encoding(16.0, 31, 1000.0, False), 3, 3)
    assert ratio_sum == pytest.approx(1.004, abs=1e-8)
    assert clipped == 300  # the three hospitals' counts, summed under the masks
    assert np.allclose(mean, 16.0, atol=1e-5)
    for count in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="aggregation weight"):
            weight_ratio(count, 1000.0)
    with pytest.raises(ValueError, match="weight ratio"):
        encode(np.zeros(3), 1.5, 16.0, 30, 3)
