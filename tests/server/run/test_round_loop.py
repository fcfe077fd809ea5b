"""The round loop over an in-process grid: averaging, named failures, quorum, timeouts,
rejected updates and the records of every round."""

from __future__ import annotations

import io
import json
import time
from functools import partial

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from prometheus_client import REGISTRY

from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.exchange import Exchange
from medfed.server.run.replies import QuorumError, ReplyCollector, SiteNames
from medfed.server.run.round_loop import RoundLoop
from medfed.server.run.round_outputs import RunOutputs
from medfed.server.run.run_record import RunRecord
from medfed.server.run.strategies import build_strategy
from medfed.shared_models.config import RunConfig
from medfed.shared_models.flat_arrays import FLAT
from medfed.shared_models.protocol import Config, Record
from tests.in_process_grid import RUN_ID, InProcessGrid, train_messages

NODES = [101, 202, 303]  # site-0, site-1, site-2
START = {"w": np.zeros(6, np.float32)}


def grid_of(deltas: dict[int, float], weights: dict[int, float] | None = None, **config):
    """Hospitals whose update is `delta` everywhere, weighted by example count."""
    updates = {n: {"w": np.full(6, d, np.float32)} for n, d in deltas.items()}
    cfg = run_config(**config)
    return InProcessGrid(updates, weights or dict.fromkeys(deltas, 1.0), cfg), cfg


def run_config(**values) -> RunConfig:
    defaults = {
        "task": "classification",
        "num-server-rounds": 3,
        "min-nodes": 2,
        "round-timeout-seconds": 1.0,
        "node-wait-seconds": 1.0,
        "federated-stats": False,
    }
    return RunConfig.from_mapping({**defaults, **values})


def run(tmp_path, grid, cfg, run_id: int = RUN_ID, request=None, start=START):
    """Run the loop; returns (final arrays or the error, metrics.json, progress text)."""
    record = RunRecord(cfg, tmp_path)
    progress = io.StringIO()
    outputs = RunOutputs(record, RoundTelemetry(run_id, cfg.task), progress, run_id, cfg)
    loop = RoundLoop(grid, cfg, outputs, partial(build_strategy, cfg), run_id, request=request)
    try:
        result = loop.run(ArrayRecord({k: Array(v) for k, v in start.items()}))
    except QuorumError as err:
        result = err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    return result, metrics, progress.getvalue()


def test_every_round_averages_the_weighted_updates_and_is_recorded(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 2.0, 303: 4.0}, {101: 1.0, 202: 1.0, 303: 2.0})
    arrays, metrics, progress = run(tmp_path, grid, cfg)
    weighted = (1.0 + 2.0 + 2 * 4.0) / 4
    assert np.allclose(arrays["w"].numpy(), 3 * weighted)  # three rounds of the same mean
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    for entry in metrics["rounds"]:
        assert entry["replied"] == ["site-0", "site-1", "site-2"] and entry["failures"] == {}
    assert metrics["rounds"][1]["sites"]["site-2"]["train-examples"] == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"round-{r:03d}.pt" for r in range(4)
    ]
    assert "round 3/3 | sites 3/3" in progress


def test_a_silent_hospital_is_named_and_the_round_goes_on_with_the_quorum(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 1.0, 303: 7.0})
    grid.silent_from[303] = 2
    arrays, metrics, progress = run(tmp_path, grid, cfg)
    assert np.allclose(arrays["w"].numpy(), (1.0 + 7.0 + 1.0) / 3 + 1.0 + 1.0)
    late = metrics["rounds"][2]
    assert late["replied"] == ["site-0", "site-1"]
    assert late["failures"] == {
        "site-2": "timed out: no reply after 1s (config key 'round-timeout-seconds')"
    }
    assert "  site-2: timed out: no reply after 1s" in progress
    assert "round 2/3 | sites 2/3" in progress


@pytest.mark.parametrize("separate", [False, True], ids=["folded", "separate"])
def test_each_round_records_when_its_exchanges_went_out_and_each_reply_arrived(tmp_path, separate):
    """metrics.json `exchanges`: push time (Unix, the nodes' clock) and each hospital's
    arrival, by site; a silent hospital has no arrival and the wait lasts the timeout."""
    grid, cfg = grid_of({101: 1.0, 202: 1.0, 303: 7.0}, **{"separate-evaluation": separate})
    grid.silent_from[303] = 2
    before = time.time()
    _, metrics, _ = run(tmp_path, grid, cfg)
    after = time.time()
    rounds = [r["exchanges"] for r in metrics["rounds"]]
    # a round's model is validated by the next round's training messages, the last one
    # (and the initial one) in messages of their own; or in a message per round
    folded = [["evaluate"], ["train"], ["train"], ["train", "evaluate"]]
    each = [["evaluate"], *[["train", "evaluate"]] * 3]
    assert [[e["message"] for e in r] for r in rounds] == (each if separate else folded)
    assert all(list(e["replies"]) == ["site-0", "site-1", "site-2"] for e in rounds[1])
    late = rounds[2][0]
    assert list(late["replies"]) == ["site-0", "site-1"] and late["seconds"] >= 0.99
    sent = [e["sent-at"] for r in rounds for e in r]
    assert sent == sorted(sent) and before <= sent[0] and sent[-1] <= after
    assert all(0 <= s <= e["seconds"] for r in rounds for e in r for s in e["replies"].values())


def test_a_lost_node_is_named_once_by_its_site_not_by_the_superlink_that_answers_for_it(
    tmp_path,
):
    """Flower answers for a node whose heartbeats stopped with an error reply whose sender
    is the SuperLink itself: the failure belongs to the node the message went to."""
    grid, cfg = grid_of({101: 1.0, 202: 1.0, 303: 7.0})
    grid.unavailable_from[303] = 2
    arrays, metrics, progress = run(tmp_path, grid, cfg)
    assert np.allclose(arrays["w"].numpy(), (1.0 + 7.0 + 1.0) / 3 + 1.0 + 1.0)
    for late in metrics["rounds"][2:]:
        assert late["replied"] == ["site-0", "site-1"]
        assert list(late["failures"]) == ["site-2"]
        assert late["failures"]["site-2"].startswith("node unavailable: its heartbeats stopped")
    assert "node-1" not in json.dumps(metrics) and "node-1" not in progress
    assert "round 2/3 | sites 2/3" in progress


def test_quorum_lost_in_round_k_fails_naming_the_missing_hospital(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 1.0, 303: 1.0}, **{"min-nodes": 3})
    grid.silent_from[202] = 2
    error, metrics, progress = run(tmp_path, grid, cfg)
    assert isinstance(error, QuorumError)
    assert str(error) == (
        "round 2 training: 2 hospitals replied, quorum is 3 (config key 'min-nodes'); "
        "missing: site-1 (timed out: no reply after 1s (config key 'round-timeout-seconds'))"
    )
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert "  site-1: timed out: no reply after 1s" in progress


def test_a_hospital_that_raised_is_named_with_its_exception_when_the_quorum_fails(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 1.0}, **{"min-nodes": 2})

    def refuse(message: Message) -> Message:
        raise PermissionError("app package sha256 ab12 is not approved at site-1")

    grid.hostile[202] = refuse
    error, _, _ = run(tmp_path, grid, cfg)
    assert isinstance(error, QuorumError) and str(error).endswith(
        "missing: site-1 (error: PermissionError: app package sha256 ab12 is not approved at "
        "site-1)"
    )


def test_a_rejected_update_names_its_hospital_and_never_reaches_the_model(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 3.0, 303: 5.0}, **{"num-server-rounds": 1, "min-nodes": 1})
    grid.updates[202]["w"][2] = np.nan
    grid.hostile[303] = lambda message: grid.training_reply(
        message, 303, {"w": np.zeros(6, np.float32), "extra": np.zeros(2, np.float32)}
    )
    arrays, metrics, _ = run(tmp_path, grid, cfg)
    failures = metrics["rounds"][1]["failures"]
    assert failures["site-1"] == "rejected update: 'w' contains NaN or infinite values"
    assert failures["site-2"] == "rejected update: unexpected arrays ['extra']"
    assert np.allclose(arrays["w"].numpy(), 1.0), "only site-0's update was averaged"


def test_a_hospital_that_fails_is_named_with_its_own_reason(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 1.0, 303: 1.0}, **{"num-server-rounds": 1})

    def crash(message: Message) -> Message:
        raise RuntimeError("CUDA out of memory on the hospital's GPU")

    grid.hostile[101] = crash
    _, metrics, _ = run(tmp_path, grid, cfg)
    assert metrics["rounds"][1]["failures"] == {
        "site-0": "error: RuntimeError: CUDA out of memory on the hospital's GPU"
    }


def test_too_few_connected_hospitals_fail_within_the_wait(tmp_path):
    grid, cfg = grid_of({101: 1.0}, **{"min-nodes": 2})
    error, metrics, _ = run(tmp_path, grid, cfg)
    assert str(error) == (
        "only 1 of the required 2 hospitals connected after waiting 1s "
        "(config key 'node-wait-seconds')"
    )
    assert metrics["rounds"] == []


def test_a_secure_round_reaches_the_plain_rounds_model(tmp_path):
    deltas, weights = {101: 0.5, 202: -0.25, 303: 1.0}, {101: 3.0, 202: 1.0, 303: 4.0}
    plain, _, _ = run(tmp_path / "plain", *grid_of(deltas, weights))
    # the public maximum weight set at the largest site keeps every hospital's weight and
    # the resolution of the weighted sum (docs/security.md)
    secure_run = {"secure-aggregation": True, "secagg-max-weight": 4.0}
    secure, metrics, _ = run(tmp_path / "secure", *grid_of(deltas, weights, **secure_run))
    assert np.abs(plain["w"].numpy() - secure["w"].numpy()).max() < 1e-6
    summary = metrics["rounds"][2]["secure-aggregation"]
    assert summary["survivors"] == 3 and set(summary["stage-seconds"]) == {"upload", "unmask"}


def test_prometheus_counts_the_hospitals_asked_to_train_and_only_validation_metrics(tmp_path):
    run_id = 8123
    nodes = {n: 1.0 for n in (11, 22, 33, 44)}
    grid, cfg = grid_of(nodes, **{"num-server-rounds": 1, "fraction-train": 0.5})
    run(tmp_path, grid, cfg, run_id)

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"run": str(run_id), **labels})

    assert sample("medfed_hospitals", state="sampled") == 2  # evaluation asked all 4
    assert sample("medfed_hospitals", state="connected") == 4
    site = {"task": "classification", "site": "site-0"}
    assert sample("medfed_site_validation_metric", metric="auc", **site) == 0.5
    for training_only in ("images-per-second", "generated-images", "aggregation-weight"):
        assert sample("medfed_site_validation_metric", metric=training_only, **site) is None


@pytest.mark.parametrize("stage", ["advertise", "upload", "unmask"])
def test_a_secure_round_survives_a_dropout_at_any_stage(tmp_path, stage):
    grid, cfg = grid_of(
        {101: 1.0, 202: 1.0, 303: 1.0, 404: 1.0},
        **{"secure-aggregation": True, "num-server-rounds": 1, "secagg-max-weight": 1.0},
    )
    grid.drop[stage] = {404}
    arrays, metrics, _ = run(tmp_path, grid, cfg)
    assert np.allclose(arrays["w"].numpy(), 1.0, atol=1e-6)
    reason = metrics["rounds"][1]["failures"]["site-3"]
    assert reason.startswith(f"{stage}: timed out: no reply after")


def test_replies_are_aggregated_in_site_order_whatever_order_they_arrive_in():
    """A float sum depends on its order: sorting by site makes a seeded run reproducible."""
    grid, _ = grid_of({303: 1.0, 101: 2.0, 202: 3.0})  # site-0, site-1, site-2
    exchange = ReplyCollector(Exchange(grid, 1.0), SiteNames())
    messages = train_messages([202, 101, 303], START)  # answered in this order
    replies = exchange.collect(messages, messages[0].content["arrays"])
    assert [r.metadata.src_node_id for r in grid.seen] == [202, 101, 303]
    assert [exchange.names(r.metadata.src_node_id) for r in replies.ok] == [
        "site-0",
        "site-1",
        "site-2",
    ]


def _metric(key: str, value):
    def corrupt(reply: Message) -> Message:
        reply.content["metrics"][key] = value
        return reply

    return corrupt


def _garbage_arrays(reply: Message) -> Message:
    """Arrays whose names and shapes are right but whose bytes are no NumPy array."""
    record = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord(
        {
            key: Array(dtype="float32", shape=tuple(record[key].shape), stype="numpy.ndarray",
                       data=b"not an array")
            for key in record
        }
    )  # fmt: skip
    return reply


def _site_name(name):
    def corrupt(reply: Message) -> Message:
        if name is None:
            del reply.content["site"]["name"]
        else:
            reply.content["site"]["name"] = name
        return reply

    return corrupt


@pytest.mark.parametrize(
    ("stage", "corrupt", "reason"),
    [
        ("upload", _garbage_arrays, "'w' is not a readable array of shape (6,)"),
        ("upload", _site_name(None), "site name 'None' is not a short label"),
        ("upload", _site_name("site-0"), "site name 'site-0' differs from the 'site-1'"),
        ("evaluate", _site_name("../../srv/images"), "is not a short label"),
        ("upload", _metric("aggregation-weight", float("nan")), "not a positive number"),
        ("upload", _metric("train-loss", float("inf")), "'train-loss' is not a finite number"),
        ("evaluate", _metric("auc", [1.0, float("nan")]), "'auc' is not a finite number"),
        ("evaluate", _metric("extra-metric", 1.0), "metrics differ from the other hospitals'"),
    ],
)
def test_malformed_metrics_drop_their_hospital_not_the_run(tmp_path, stage, corrupt, reason):
    grid, cfg = grid_of({101: 1.0, 202: 2.0, 303: 3.0}, **{"num-server-rounds": 1})
    grid.corrupt[(stage, 202)] = corrupt
    arrays, metrics, _ = run(tmp_path, grid, cfg)
    assert reason in metrics["rounds"][1]["failures"]["site-1"]
    assert sorted(metrics["rounds"][1]["replied"]) == (
        ["site-0", "site-2"] if stage == "upload" else ["site-0", "site-1", "site-2"]
    )
    assert isinstance(arrays, ArrayRecord)


def test_model_arrays_travel_packed_and_a_reply_that_does_not_unpack_loses_its_site(tmp_path):
    """Each way, a message's arrays are one packed array and a layout; the hospitals and
    the strategy see named arrays. A reply whose layout does not fit its bytes is refused."""
    two = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}
    deltas = {101: 1.0, 202: 2.0, 303: 3.0}
    updates = {n: {k: np.full_like(v, d) for k, v in two.items()} for n, d in deltas.items()}
    cfg = run_config(**{"num-server-rounds": 1})
    grid = InProcessGrid(updates, dict.fromkeys(updates, 1.0), cfg)
    packed = []

    def seen_packed(message: Message) -> Message:
        packed.append(list(message.content[Record.ARRAYS]) == [FLAT])
        return message

    def bad_layout(reply: Message) -> Message:
        packed.append(list(reply.content[Record.ARRAYS]) == [FLAT])
        reply.content[Record.LAYOUT]["shapes"] = ["6", "3"]
        return reply

    grid.alter[("upload", 101)] = seen_packed
    grid.corrupt[("upload", 202)] = bad_layout
    arrays, metrics, _ = run(tmp_path, grid, cfg, start=two)
    assert packed == [True, True]
    failure = metrics["rounds"][1]["failures"]["site-1"]
    assert "malformed packed arrays: array 'b' runs past the packed bytes" in failure
    assert metrics["rounds"][1]["replied"] == ["site-0", "site-2"]
    assert np.allclose(arrays["w"].numpy(), 2.0) and np.allclose(arrays["b"].numpy(), 2.0)


HONEST = {101: 1.0, 202: 1.2, 303: 0.8}  # three honest hospitals' (varied) updates
ATTACKER = 404


def poisoned_grid(**config):
    """Three honest hospitals and one that sends NaNs in round 1, then its update x100."""
    grid, cfg = grid_of({**HONEST, ATTACKER: 1.0}, **{"num-server-rounds": 2, **config})

    def attack(message: Message) -> Message:
        start = message.content["arrays"]["w"].numpy()
        if InProcessGrid.round_of(message) == 1:
            update = np.full(6, np.nan, np.float32)
        else:
            update = start + 100 * np.ones(6, np.float32)
        return grid.training_reply(message, ATTACKER, {"w": update})

    grid.hostile[ATTACKER] = attack
    return grid, cfg


def honest_only(tmp_path, **config) -> np.ndarray:
    grid, cfg = grid_of(HONEST, **{"num-server-rounds": 2, **config})
    arrays, _, _ = run(tmp_path / "honest", grid, cfg)
    return arrays["w"].numpy()


def test_nan_then_a_scaled_update_are_rejected_naming_the_hospital(tmp_path):
    grid, cfg = poisoned_grid()
    arrays, metrics, _ = run(tmp_path, grid, cfg)
    assert np.all(np.isfinite(arrays["w"].numpy()))
    assert np.allclose(arrays["w"].numpy(), honest_only(tmp_path), atol=1e-6)
    first, second = (metrics["rounds"][r]["failures"]["site-3"] for r in (1, 2))
    assert first == "rejected update: 'w' contains NaN or infinite values"
    assert second.startswith("rejected update: it changes the model by 245, more than 10 x")
    assert "(config key 'update-norm-factor')" in second


def test_without_the_norm_check_the_scaled_update_drags_a_plain_mean(tmp_path):
    """The attack is real: FedAvg with the check off ends far from the honest result."""
    grid, cfg = poisoned_grid(**{"update-norm-factor": 0.0})
    arrays, _, _ = run(tmp_path, grid, cfg)
    assert np.abs(arrays["w"].numpy() - honest_only(tmp_path)).max() > 20


@pytest.mark.parametrize(
    "robust", [{"strategy": "fedmedian"}, {"strategy": "krum", "krum-byzantine": 1}]
)
def test_robust_strategies_bound_the_scaled_update_without_the_norm_check(tmp_path, robust):
    grid, cfg = poisoned_grid(**{"update-norm-factor": 0.0, **robust})
    arrays, metrics, _ = run(tmp_path, grid, cfg)
    honest = honest_only(tmp_path)
    spread = 2 * (max(HONEST.values()) - min(HONEST.values()))  # two rounds of honest spread
    assert np.abs(arrays["w"].numpy() - honest).max() <= spread
    assert metrics["rounds"][2]["replied"] == ["site-0", "site-1", "site-2", "site-3"]


def test_a_scaled_update_needs_a_cohort_to_stand_out_from():
    """With two updates the median says nothing: the check is left to the robust strategies."""
    from medfed.server.run.replies import RoundReplies, reject_outsized_updates

    start = {"w": np.zeros(6, np.float32)}
    grid = InProcessGrid({1: {"w": np.ones(6, np.float32)}, 2: {"w": np.ones(6, np.float32)}},
                         {1: 1.0, 2: 1.0}, run_config())  # fmt: skip
    messages = train_messages([1, 2], start)
    grid.push_messages(messages)
    replies = RoundReplies(ok=grid.pull_messages([m.metadata.message_id for m in messages]))
    reject_outsized_updates(replies, messages[0].content["arrays"], 10.0, SiteNames())
    assert len(replies.ok) == 2 and not replies.failed


def test_a_cohort_of_unchanged_models_never_gets_the_honest_update_rejected(tmp_path):
    """Two of three hospitals send the model back unchanged: a median of zero scales
    nothing, so the check stands aside (and says so) instead of rejecting the third."""
    grid, cfg = grid_of({101: 0.0, 202: 0.0, 303: 3.0}, **{"num-server-rounds": 1})
    arrays, metrics, progress = run(tmp_path, grid, cfg)
    assert metrics["rounds"][1]["failures"] == {}
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert "update-norm check skipped: the median update changes nothing" in progress


def test_with_fewer_than_three_updates_the_norm_check_says_it_stood_aside(tmp_path):
    grid, cfg = grid_of({101: 1.0, 202: 50.0}, **{"num-server-rounds": 1})
    _, metrics, progress = run(tmp_path, grid, cfg)
    assert metrics["rounds"][1]["failures"] == {}
    assert "update-norm check skipped: 2 usable update(s), it needs 3 to compare" in progress


@pytest.mark.parametrize("secure", [False, True])
def test_every_training_and_evaluation_request_carries_the_runs_request_keys(tmp_path, secure):
    """A bundle run's configs hash reaches every hospital with every round's work."""
    settings = {"secure-aggregation": secure, "task": "bundle", "bundle": "/bundles/b"}
    grid, cfg = grid_of({101: 1.0, 202: 2.0, 303: 4.0}, **settings)
    request = {Config.BUNDLE_SHA256: "ab" * 32}
    _, metrics, _ = run(tmp_path, grid, cfg, request=request)
    assert metrics["status"] == "running" and len(metrics["rounds"]) == 4  # the loop finished
    work = [m for m in grid.pushed if m.metadata.message_type in ("train", "evaluate")]
    assert {m.metadata.message_type for m in work} == {"train", "evaluate"}
    assert all(
        m.content[Record.CONFIG][Config.BUNDLE_SHA256] == request[Config.BUNDLE_SHA256]
        for m in work
    )
    assert {int(m.content[Record.CONFIG][Config.SERVER_ROUND]) for m in work} == {0, 1, 2, 3}


def test_a_hospital_lost_before_its_first_reply_is_said_to_be_unnamed(tmp_path):
    """Issue 25: such a hospital was named `node-12255…`, which no one could place."""
    grid, cfg = grid_of({101: 1.0, 202: 1.0}, **{"min-nodes": 2})
    grid.unavailable_from[202] = 0
    error, _, _ = run(tmp_path, grid, cfg)
    assert isinstance(error, QuorumError)
    assert "missing: a hospital not yet named (node 202, it never replied) (node unavailable" in (
        str(error)
    )


@pytest.mark.parametrize(("noise", "swamped"), [(3.0, True), (0.5, False)])
def test_dp_noise_that_swamps_every_update_is_said_at_the_start_and_every_round(
    tmp_path, noise, swamped
):
    """Issue 25: the README's example ran 20 rounds of noise (val loss 1555) in silence.
    Three hospitals, six values: the noise's norm is noise x sqrt(6) / 3 the largest mean."""
    grid, cfg = grid_of(
        {101: 1.0, 202: 2.0, 303: 4.0},
        **{"dp.mode": "server", "dp.noise-multiplier": noise, "dp.clipping-norm": 1.0},
    )
    _, metrics, progress = run(tmp_path, grid, cfg)
    ratio = noise * 6**0.5 / 3
    assert [r.get("dp-noise-ratio") for r in metrics["rounds"]] == [None] + [round(ratio, 3)] * 3
    warned = "WARNING: the DP noise added to each round's mean is 2x the largest update"
    assert (warned in progress) is swamped
    marked = [line for line in progress.splitlines() if "| DP noise 2x the largest update" in line]
    assert len(marked) == (3 if swamped else 0), progress
