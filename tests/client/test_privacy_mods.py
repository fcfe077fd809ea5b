"""The mods around the hospital's handlers: DP clipping before masking, small counts
suppressed on the way out, and an audit line of exactly what left the site."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from medfed.client.app import TRAIN_MODS
from medfed.client.data.site import load_site
from medfed.client.data.site_summary import HISTOGRAM_BINS, site_summary
from medfed.client.privacy.dp_clipping import dp_clipping_mod
from medfed.client.privacy.secagg_hospital import SecAggRefused
from medfed.client.privacy.small_counts import small_count_mod
from medfed.server.exchange import Exchange, SiteNames
from medfed.server.secure_aggregation import SecureAggregation
from medfed.shared_models.audit import AUDIT_ENV, read_audit
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import SUPPRESSED, Config, Metric, Record, SiteKey, Statistic
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


def context(run_config: RunConfig) -> Context:
    return Context(RUN_ID, 5, {}, RecordDict(), run_config.to_mapping())


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
    cfg = secure_config(**{"dp.mode": "client", "dp.clipping-norm": 0.5})
    grid = InProcessGrid(updates, dict.fromkeys(nodes, 1.0), cfg)
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    messages = train_messages(nodes, start)
    messages[0].content[Record.CONFIG][KEY_CLIPPING_NORM] = 0.5  # as Flower's DP wrapper sets it
    secure = SecureAggregation(Exchange(grid, 0.2, SiteNames()), cfg, RUN_ID)
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
    secure = SecureAggregation(Exchange(grid, 0.2, SiteNames()), cfg, RUN_ID)
    secure.train_round(1, train_messages(nodes, start), SHAPES)
    trained = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "round-trained"]
    assert sorted(e["site"] for e in trained) == ["site-0", "site-1", "site-2"]
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    for entry in trained:
        assert entry["masked"] is True and entry["sent_arrays"] == {"masked": [size]}
        assert entry["round"] == 1 and entry["clipped_to_norm"] is None
        assert Metric.SECAGG_CLIPPED in entry["sent_metrics"]
    text = (tmp_path / "audit.jsonl").read_text()
    assert str(float(updates[11]["fc.weight"][0, 0]))[:8] not in text, "values never audited"


def test_small_counts_never_leave_the_site(cls_sites):
    cfg = tiny_config(task="classification")
    site = load_site(cls_sites / "site-2", cfg)
    labels = [site.facts[e["where"]]["label"] for e in site.train + site.val]
    exact = site_summary(site, cfg)
    assert exact[Statistic.LABEL_HISTOGRAM] == [labels.count(i) for i in range(3)]
    assert exact[Statistic.NUM_TRAIN] == len(site.train)
    assert sum(exact[Statistic.INTENSITY_HISTOGRAM]) == pytest.approx(1.0, abs=1e-3)

    def summary_handler(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({Record.METRICS: MetricRecord(dict(exact))}), reply_to=msg)

    chain = make_ffn(summary_handler, [small_count_mod])

    def sent(min_count: int) -> MetricRecord:
        msg = incoming("query", {Config.STATS_MIN_COUNT: min_count})
        return chain(msg, context(cfg)).content[Record.METRICS]

    threshold = sorted(labels.count(i) for i in range(3))[1]  # hides the rarest class
    guarded = sent(threshold)
    for shown, true in zip(
        guarded[Statistic.LABEL_HISTOGRAM], exact[Statistic.LABEL_HISTOGRAM], strict=True
    ):
        assert shown == (true if true >= threshold else SUPPRESSED)
    assert SUPPRESSED in guarded[Statistic.LABEL_HISTOGRAM]
    tiny = sent(10_000)
    assert tiny[Statistic.NUM_TRAIN] == tiny[Statistic.NUM_VAL] == SUPPRESSED
    assert tiny[Statistic.INTENSITY_HISTOGRAM] == [float(SUPPRESSED)] * HISTOGRAM_BINS


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
        content = {Record.METRICS: MetricRecord(counts), Record.SITE: SITE_A}
        return Message(RecordDict(content), reply_to=msg)

    monkeypatch.setattr(handlers, "query", exact_summary)
    reply = app(incoming("query", {Config.STATS_MIN_COUNT: 5}), context(RunConfig()))
    sent = reply.content[Record.METRICS]
    assert sent[Statistic.NUM_VAL] == SUPPRESSED
    assert sent[Statistic.LABEL_HISTOGRAM] == [30, SUPPRESSED, 11]

    monkeypatch.setattr(
        handlers, "train", adding({k: np.ones(s, np.float32) for k, s in SHAPES.items()})
    )
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(SecAggRefused, match="not sent in the clear"):
        app(incoming("train", {Config.SERVER_ROUND: 1}, start), context(secure_config()))
