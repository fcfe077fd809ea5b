"""The mods around the hospital's handlers: DP clipping before masking, the site's one
decision on its counts applied on the way out, and an audit line of exactly what left."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from medfed.client.app import TRAIN_MODS
from medfed.client.data.site import load_site
from medfed.client.data.site_statistics import HISTOGRAM_BINS, site_summary
from medfed.client.privacy.disclosure import SiteCounts, decide, remember
from medfed.client.privacy.filters import disclose_reply, dp_clipping_mod, small_count_mod
from medfed.client.privacy.secagg_hospital import SecAggRefused
from medfed.server.run.exchange import Exchange
from medfed.server.run.replies import ReplyCollector, SiteNames
from medfed.server.secagg.workflow import SecureAggregation
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import (
    SUPPRESSED,
    Config,
    ErrorCode,
    Metric,
    NodeConfig,
    Record,
    SiteKey,
    Statistic,
)
from tests.audit_log import read_audit
from tests.conftest import tiny_config
from tests.in_process_grid import (
    RUN_ID,
    InProcessGrid,
    act_as_coordinator,
    secure_config,
    train_messages,
)

SHAPES = {"conv.weight": (4, 3, 3), "fc.weight": (2, 8)}
SITE_A = ConfigRecord({SiteKey.NAME: "site-a"})


def incoming(message_type: str, config: dict, arrays: dict | None = None) -> Message:
    """A message as a SuperNode hands it to the ClientApp (with Flower's message id)."""
    act_as_coordinator()
    content = RecordDict({Record.CONFIG: ConfigRecord(config)})
    if arrays is not None:
        content[Record.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    message = Message(content=content, dst_node_id=5, message_type=message_type)
    message.metadata.__dict__["_message_id"] = str(uuid4())
    return message


def context(run_config: RunConfig, floor: int | None = None) -> Context:
    """A node's context; `floor` is its `min-count` (None: a node started without one)."""
    node_config = {} if floor is None else {NodeConfig.MIN_COUNT: floor}
    return Context(RUN_ID, 5, node_config, RecordDict(), run_config.to_mapping())


def adding(update: dict[str, np.ndarray]):
    """A train handler that returns the received arrays plus `update`, as site-a."""

    def handler(msg: Message, ctx: Context) -> Message:
        received = msg.content[Record.ARRAYS]
        arrays = ArrayRecord({k: Array(received[k].numpy() + update[k]) for k in update})
        metrics = MetricRecord(
            {Metric.WEIGHT: 1.0, Metric.NUM_EXAMPLES: 4, Metric.SKIPPED_FILES: 0}
        )
        content = {Record.ARRAYS: arrays, Record.METRICS: metrics, Record.SITE: SITE_A}
        return Message(RecordDict(content), reply_to=msg)

    return handler


def norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in arrays.values())))


@pytest.mark.parametrize("adaptive", [False, True])
def test_dp_clipping_mod_clips_the_update_to_the_coordinators_norm(adaptive):
    rng = np.random.default_rng(0)
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    update = {k: 5 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    cfg = RunConfig.from_mapping({"dp.mode": "client", "dp.adaptive": adaptive})
    chain = make_ffn(adding(update), [dp_clipping_mod])
    msg = incoming("train", {Config.SERVER_ROUND: 1, KEY_CLIPPING_NORM: 0.5}, start)
    reply = chain(msg, context(cfg))
    sent = {k: a.numpy() for k, a in reply.content[Record.ARRAYS].items()}
    assert norm({k: sent[k] - start[k] for k in start}) == pytest.approx(0.5, rel=1e-4)
    assert all(sent[k].dtype == np.float32 for k in sent)
    assert (KEY_NORM_BIT in reply.content[Record.METRICS]) is adaptive
    if adaptive:
        assert reply.content[Record.METRICS][KEY_NORM_BIT] == 1  # it was clipped
    small = {k: np.full(s, 1e-3, np.float32) for k, s in SHAPES.items()}
    kept = make_ffn(adding(small), [dp_clipping_mod])(msg, context(cfg))
    for key, array in kept.content[Record.ARRAYS].items():
        assert np.allclose(array.numpy(), start[key] + small[key])
    if adaptive:
        assert kept.content[Record.METRICS][KEY_NORM_BIT] == 0


def test_without_a_clipping_norm_the_update_passes_unchanged():
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    update = {k: np.full(s, 7.0, np.float32) for k, s in SHAPES.items()}
    chain = make_ffn(adding(update), [dp_clipping_mod])
    reply = chain(incoming("train", {Config.SERVER_ROUND: 1}, start), context(RunConfig()))
    assert all(np.array_equal(a.numpy(), update[k]) for k, a in reply.content["arrays"].items())


def test_hospitals_clip_before_they_mask():
    """The secure mean of DP-clipped updates is the mean of the clipped updates: each
    hospital clipped in the clear, then masked (the other order could not even run)."""
    rng = np.random.default_rng(3)
    nodes = [11, 22, 33]
    updates = {
        n: {k: 3 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for n in nodes
    }
    cfg = secure_config(**{"dp.mode": "client", "dp.clipping-norm": 0.5, "dp.noise": "coordinator"})
    grid = InProcessGrid(updates, dict.fromkeys(nodes, 1.0), cfg)
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    messages = train_messages(nodes, start, 1, cfg)  # the clipping norm, as Flower's DP wrapper
    secure = SecureAggregation(ReplyCollector(Exchange(grid, 0.2), SiteNames()), cfg, RUN_ID)
    outcome = secure.train_round(1, messages, SHAPES)
    assert not outcome.failed
    clipped = [{k: u[k] * min(1.0, 0.5 / norm(u)) for k in u} for u in updates.values()]
    for key in SHAPES:
        expected = np.mean([c[key] for c in clipped], axis=0)
        assert np.abs(outcome.mean_update[key] - expected).max() < 1e-5


def test_the_audit_line_is_what_left_the_site(tmp_path, monkeypatch):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    rng = np.random.default_rng(4)
    nodes = [11, 22, 33]
    updates = {
        n: {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for n in nodes
    }
    cfg = secure_config()
    grid = InProcessGrid(updates, dict.fromkeys(nodes, 2.0), cfg)
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    secure = SecureAggregation(ReplyCollector(Exchange(grid, 0.2), SiteNames()), cfg, RUN_ID)
    secure.train_round(1, train_messages(nodes, start), SHAPES)
    trained = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "round-trained"]
    assert sorted(e["site"] for e in trained) == ["site-0", "site-1", "site-2"]
    size = sum(int(np.prod(s)) for s in SHAPES.values()) + 2  # the update, weight, clipped
    for entry in trained:
        assert entry["masked"] is True and entry["sent_arrays"] == {"masked": [size]}
        assert entry["round"] == 1 and entry["clipped_to_norm"] is None
        # how many of its own values were clipped is in the masked vector, never in the clear
        assert not [m for m in entry["sent_metrics"] if "clipped" in m]
    text = (tmp_path / "audit.jsonl").read_text()
    assert str(float(updates[11]["fc.weight"][0, 0]))[:8] not in text, "values never audited"


def summary_handler(summary: dict, counts: SiteCounts):
    """A query handler that states `counts` and replies `summary`, as `handlers.query` does."""

    def handler(msg: Message, ctx: Context) -> Message:
        remember(ctx, counts)
        return Message(RecordDict({Record.METRICS: MetricRecord(dict(summary))}), reply_to=msg)

    return handler


def test_small_counts_never_leave_the_site(cls_sites):
    # a split of 10 and 10; the run asks for no minimum of its own
    cfg = tiny_config(task="classification", val_fraction=0.5, stats_min_count=1)
    site = load_site(cls_sites / "site-2", cfg)
    labels = [site.facts[e["where"]]["label"] for e in site.train + site.val]
    exact = site_summary(site, cfg)
    assert exact[Statistic.LABEL_HISTOGRAM] == [labels.count(i) for i in range(3)]
    assert exact[Statistic.NUM_TRAIN] == len(site.train)
    assert sum(exact[Statistic.INTENSITY_HISTOGRAM]) == pytest.approx(1.0, abs=1e-3)
    counts = SiteCounts(len(site.train), len(site.val), tuple(exact[Statistic.LABEL_HISTOGRAM]))
    chain = make_ffn(summary_handler(exact, counts), [small_count_mod])

    def sent(min_count: int, floor: int | None = 1) -> MetricRecord:
        msg = incoming("query", {Config.STATS_MIN_COUNT: min_count})
        return chain(msg, context(cfg, floor)).content[Record.METRICS]

    # a floor the split clears, under which the rarest class is hidden
    threshold = sorted(labels.count(i) for i in range(3))[1]
    assert threshold <= len(site.val), "the fixture's site must allow this case"
    guarded = sent(threshold)
    assert guarded[Statistic.NUM_TRAIN] == len(site.train)
    # the classes add up to the images: with one hidden, all are
    assert guarded[Statistic.LABEL_HISTOGRAM] == [SUPPRESSED] * 3
    rarest = min(labels.count(i) for i in range(3))
    assert sent(rarest)[Statistic.LABEL_HISTOGRAM] == exact[Statistic.LABEL_HISTOGRAM]
    tiny = sent(10_000)
    assert tiny[Statistic.NUM_TRAIN] == tiny[Statistic.NUM_VAL] == SUPPRESSED
    assert tiny[Statistic.LABEL_HISTOGRAM] == [SUPPRESSED] * 3
    assert tiny[Statistic.INTENSITY_HISTOGRAM] == [float(SUPPRESSED)] * HISTOGRAM_BINS
    # the site's floor wins over a coordinator asking for exact counts
    floored = sent(1, floor=threshold)
    assert floored[Statistic.LABEL_HISTOGRAM] == guarded[Statistic.LABEL_HISTOGRAM]
    assert floored[Statistic.MIN_COUNT] == threshold, "the coordinator learns which minimum held"
    assert sent(1, floor=None)[Statistic.MIN_COUNT] == 10  # a node started without a floor


def test_without_the_handlers_counts_every_count_is_hidden():
    """A handler that states no counts (a new route, a bug) fails closed: nothing is shown."""
    summary = {
        Statistic.NUM_TRAIN: 500,
        Statistic.NUM_VAL: 120,
        Statistic.LABEL_HISTOGRAM: [300, 320],
        Statistic.INTENSITY_HISTOGRAM: [0.5, 0.5],
    }

    def stating_nothing(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({Record.METRICS: MetricRecord(summary)}), reply_to=msg)

    msg = incoming("query", {Config.STATS_MIN_COUNT: 1})
    sent = make_ffn(stating_nothing, [small_count_mod])(msg, context(RunConfig(), 10))
    sent = sent.content[Record.METRICS]
    assert sent[Statistic.NUM_TRAIN] == sent[Statistic.NUM_VAL] == SUPPRESSED
    assert sent[Statistic.LABEL_HISTOGRAM] == [SUPPRESSED, SUPPRESSED]
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    trained = make_ffn(adding({k: np.ones(s, np.float32) for k, s in SHAPES.items()}), TRAIN_MODS)
    reply = trained(incoming("train", {Config.SERVER_ROUND: 1}, start), context(RunConfig(), 10))
    assert reply.content[Record.METRICS][Metric.NUM_EXAMPLES] == SUPPRESSED
    assert reply.content[Record.METRICS][Metric.WEIGHT] == 10.0


def test_a_secure_run_never_sends_an_update_in_the_clear():
    """Secure or not is the run's config, not the message: a coordinator that leaves the
    neighbours' shares out of a secure round's training message gets a refusal."""
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    update = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    chain = make_ffn(adding(update), TRAIN_MODS)
    msg = incoming("train", {Config.SERVER_ROUND: 1}, start)
    with pytest.raises(SecAggRefused, match="not sent in the clear"):
        chain(msg, context(secure_config()))
    plain = chain(incoming("train", {Config.SERVER_ROUND: 1}, start), context(RunConfig()))
    assert set(plain.content[Record.ARRAYS]) == set(SHAPES)


def test_the_client_app_routes_through_its_mods(monkeypatch):
    """The ClientApp itself: the query route suppresses, the train route masks or refuses."""
    from medfed.client import handlers
    from medfed.client.app import app

    counts = {
        Statistic.NUM_TRAIN: 40, Statistic.NUM_VAL: 3, Statistic.LABEL_HISTOGRAM: [30, 2, 11],
        Statistic.INTENSITY_P1: 0.0, Statistic.INTENSITY_P99: 1.0,
        Statistic.INTENSITY_HISTOGRAM: [0.5, 0.5],
    }  # fmt: skip

    def exact_summary(msg: Message, ctx: Context) -> Message:
        remember(ctx, SiteCounts(40, 3, (30, 2, 11)))
        content = {Record.METRICS: MetricRecord(counts), Record.SITE: SITE_A}
        return Message(RecordDict(content), reply_to=msg)

    monkeypatch.setattr(handlers, "query", exact_summary)
    reply = app(incoming("query", {Config.STATS_MIN_COUNT: 5}), context(RunConfig()))
    sent = reply.content[Record.METRICS]
    # val 3 is below the floor: the train count would give it away (40 + 3 = 30 + 2 + 11)
    assert sent[Statistic.NUM_VAL] == sent[Statistic.NUM_TRAIN] == SUPPRESSED
    assert sent[Statistic.LABEL_HISTOGRAM] == [SUPPRESSED] * 3

    monkeypatch.setattr(
        handlers, "train", adding({k: np.ones(s, np.float32) for k, s in SHAPES.items()})
    )
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    refused = app(incoming("train", {Config.SERVER_ROUND: 1}, start), context(secure_config()))
    assert refused.has_error() and refused.error.code == ErrorCode.SECAGG_REFUSED
    assert "not sent in the clear" in refused.error.reason


def test_a_failure_leaves_the_site_as_a_code_without_paths(tmp_path, monkeypatch):
    """A site whose data is unusable: the coordinator gets a code and generic text; the
    file names and paths stay in the node's log."""
    from medfed.client.app import app

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    site = tmp_path / "site-secret-name"
    (site / "imagesTr").mkdir(parents=True)
    (site / "dataset.json").write_text('{"task": "classification", "training": [')
    ctx = Context(RUN_ID, 5, {NodeConfig.DATA_PATH: str(site)}, RecordDict(), {})
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for message in (incoming("train", {Config.SERVER_ROUND: 1}, start),
                    incoming("query", {Config.STATS_MIN_COUNT: 5})):  # fmt: skip
        reply = app(message, ctx)
        assert reply.has_error() and reply.error.code == ErrorCode.SITE_DATA
        assert "site-secret-name" not in reply.error.reason
        assert "dataset.json" not in reply.error.reason and str(tmp_path) not in reply.error.reason
    entries = read_audit(tmp_path / "audit.jsonl")
    assert [e["code"] for e in entries if e["event"] == "reply-error"] == [ErrorCode.SITE_DATA] * 2


@pytest.mark.parametrize(
    ("counts", "floor", "shown"),
    [
        # the demo's site-2: val 8 hides the split, and with it the background cell (= 42)
        (SiteCounts(34, 8, (42, 30, 25), presence=True), 10, (-1, -1, -1, -1, -1)),
        (SiteCounts(40, 3, (30, 2, 11)), 10, (-1, -1, -1, -1, -1)),
        # a class in 35 of 40 images: the 5 without it would follow from the total
        (SiteCounts(30, 10, (40, 35, 20, 4), presence=True), 10, (30, 10, 40, -1, 20, -1)),
        (SiteCounts(30, 10, (40, 40, 20), presence=True), 10, (30, 10, 40, 40, 20)),  # every one
        # classes add up to the images: one hidden cell hides them all. Hiding only enough
        # others let a coordinator who knows the rule pin it: [6, 6, 2] under 3 showed
        # [hidden, 6, hidden], which no other histogram of 14 images shows
        (SiteCounts(11, 3, (6, 6, 2)), 3, (11, 3, -1, -1, -1)),
        (SiteCounts(28, 10, (20, 9, 9)), 10, (28, 10, -1, -1, -1)),  # 18 = 9 + 9, both under 10
        (SiteCounts(30, 10, (12, 10, 18)), 10, (30, 10, 12, 10, 18)),
    ],
)
def test_no_hidden_count_follows_from_the_shown_ones(counts, floor, shown):
    decided = decide(counts, floor)
    assert (decided.train, decided.val, *decided.histogram) == shown
    assert decided.split_shown is (shown[0] != SUPPRESSED)


def training_reply(**metrics: float) -> MetricRecord:
    return MetricRecord(
        {Metric.NUM_EXAMPLES: 8, Metric.WEIGHT: 8.0, Metric.SKIPPED_FILES: 3,
         Metric.GENERATED_IMAGES: 0, Metric.IMAGES_PER_SECOND: 40.0, Metric.TRAIN_SECONDS: 2.0,
         **metrics}
    )  # fmt: skip


def test_counts_below_the_sites_floor_never_leave_it():
    metrics = training_reply()
    disclose_reply(metrics, decide(SiteCounts(8, 2), 10), training=True, weight_is_count=True)
    assert metrics[Metric.NUM_EXAMPLES] == metrics[Metric.SKIPPED_FILES] == SUPPRESSED
    assert metrics[Metric.IMAGES_PER_SECOND] == SUPPRESSED, "rate x seconds = the count"
    assert metrics[Metric.WEIGHT] == 10.0, "a weight must stay positive: raised to the floor"
    assert metrics[Metric.GENERATED_IMAGES] == SUPPRESSED, "ratio x train = the count"
    assert metrics[Metric.TRAIN_SECONDS] == 2.0
    large = MetricRecord({Metric.NUM_EXAMPLES: 52, Metric.WEIGHT: 52.0, Metric.SKIPPED_FILES: 0})
    disclose_reply(large, decide(SiteCounts(52, 13), 10), training=True, weight_is_count=True)
    assert dict(large) == {Metric.NUM_EXAMPLES: 52, Metric.WEIGHT: 52.0, Metric.SKIPPED_FILES: 0}
    evaluated = MetricRecord({Metric.NUM_EXAMPLES: 13, Metric.WEIGHT: 13.0, "loss": 0.5})
    disclose_reply(evaluated, decide(SiteCounts(52, 13), 10), training=False, weight_is_count=True)
    assert dict(evaluated) == {Metric.NUM_EXAMPLES: 13, Metric.WEIGHT: 13.0, "loss": 0.5}
    dp = MetricRecord({Metric.NUM_EXAMPLES: 8, Metric.WEIGHT: 1.0})
    disclose_reply(dp, decide(SiteCounts(8, 2), 10), training=True, weight_is_count=False)
    assert dp[Metric.WEIGHT] == 1.0, "an equal DP weight is not a count"


def test_generated_images_are_hidden_with_the_train_count():
    """Finding (a): floor 1000, 52 training images, `gan-augment-ratio` 100: the 5200
    generated images would tell the 52."""

    def gan_training(msg: Message, ctx: Context) -> Message:
        remember(ctx, SiteCounts(52, 13))
        counts = {Metric.NUM_EXAMPLES: 52, Metric.WEIGHT: 52.0, Metric.GENERATED_IMAGES: 5200}
        content = {
            Record.METRICS: training_reply(**counts, **{Metric.SKIPPED_FILES: 0}),
            Record.ARRAYS: msg.content[Record.ARRAYS],
            Record.SITE: SITE_A,
        }
        return Message(RecordDict(content), reply_to=msg)

    gan = {"gan-model": "runs/gan", "gan-augment-ratio": 100.0}
    cfg = RunConfig.from_mapping({"task": "classification", **gan})
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    reply = make_ffn(gan_training, TRAIN_MODS)(
        incoming("train", {Config.SERVER_ROUND: 1}, start), context(cfg, 1000)
    )
    sent = reply.content[Record.METRICS]
    assert sent[Metric.GENERATED_IMAGES] == sent[Metric.NUM_EXAMPLES] == SUPPRESSED
    assert sent[Metric.WEIGHT] == 1000.0 and sent[Metric.IMAGES_PER_SECOND] == SUPPRESSED
    assert sent[Metric.SKIPPED_FILES] == 0


def test_the_clientapp_and_its_secagg_steps_load_without_torch():
    """A deployed node starts a fresh ClientApp process per message: the SecAgg+ steps
    between training and evaluation must not pay torch's import (seconds each)."""
    import subprocess
    import sys

    code = (
        "import sys, medfed.client.app, medfed.client.privacy.secagg_mod;"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
