"""The hospital's handlers on a real site: another hospital's model (cross-site
evaluation) is audited by name and never shown as the global model's metrics; a count
hidden in one reply kind is hidden in all of them."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Context, RecordDict
from prometheus_client import REGISTRY

from medfed.client.app import app
from medfed.client.handlers import NodeSite
from medfed.client.privacy.disclosure import largest_hidden_train
from medfed.client.synthetic import generate_site
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.protocol import (
    SUPPRESSED,
    Config,
    Metric,
    NodeConfig,
    Record,
    SiteKey,
    Statistic,
)
from medfed.shared_models.tasks import TASKS
from tests.audit_log import read_audit
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.conftest import tiny_config

CFG = tiny_config(task="classification")


def _evaluate(ctx: Context, config: dict, arrays: dict[str, np.ndarray]) -> dict:
    reply = app(incoming("evaluate", {Config.SERVER_ROUND: 2, **config}, arrays), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {
        "site": reply.content[Record.SITE][SiteKey.NAME],
        **dict(reply.content[Record.METRICS]),
    }


def test_another_sites_model_is_audited_by_name_and_leaves_the_sites_gauge(
    cls_sites, tmp_path, monkeypatch
):
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    node = {
        NodeConfig.DATA_PATH: str(cls_sites / "site-0"),
        NodeConfig.CACHE_DIR: str(tmp_path / "cache"),
        NodeConfig.MIN_COUNT: 1,
    }
    shown = {**CFG.to_mapping(), "stats-min-count": 1}  # a site whose counts are shown
    ctx = Context(RUN_ID, 5, node, RecordDict(), shown)
    torch.manual_seed(0)
    global_model = {
        k: v.numpy() for k, v in TASKS["classification"].build_network(CFG).state_dict().items()
    }
    local_model = {k: v + 0.5 if v.dtype == np.float32 else v for k, v in global_model.items()}

    def gauge(site: str) -> float | None:
        labels = {"site": site, "task": "classification", "metric": "loss"}
        return REGISTRY.get_sample_value("medfed_site_local_validation_metric", labels)

    before = gauge("site-0")  # the gauges are the process's: other tests may have set it
    other = _evaluate(ctx, {Config.CROSS_SITE_MODEL: "site-1"}, local_model)
    site = other["site"]
    assert site == "site-0" and gauge(site) == before, "another site's model leaves it"
    own = _evaluate(ctx, {}, global_model)
    assert gauge(site) == own["loss"] != other["loss"]
    evaluated = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "round-evaluated"]
    assert [e.get("model") for e in evaluated] == ["site-1", None]
    assert all(e["round"] == 2 and e["site"] == site for e in evaluated)


def _reply(ctx: Context, kind: str, config: dict, arrays: dict | None = None) -> dict:
    reply = app(incoming(kind, config, arrays), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return dict(reply.content[Record.METRICS])


def test_a_count_hidden_in_one_reply_is_hidden_in_every_reply(tmp_path):
    """Finding (b), the demo's site-2: 42 images split 34 / 8 under a floor of 10. The
    statistics hid the 8, while every training reply sent 34 (and the weight 34), which
    with the public split rule gives 42 - 34 = 8 back. The real handlers and mods now
    hide the split everywhere, and the node's own gauges show what was sent."""
    # 39 asked per site gives this site its 42 (the generator skews site sizes)
    site = generate_site("classification", 0, tmp_path / "site", images_per_site=39, image_size=32)
    cfg = tiny_config(task="classification", local_epochs=1)
    torch.manual_seed(0)
    model = {
        k: v.numpy() for k, v in TASKS["classification"].build_network(cfg).state_dict().items()
    }

    def replies(floor: int) -> tuple[dict, dict, dict]:
        node = {NodeConfig.DATA_PATH: str(site), NodeConfig.MIN_COUNT: floor,
                NodeConfig.CACHE_DIR: str(tmp_path / f"cache-{floor}")}  # fmt: skip
        ctx = Context(RUN_ID, 5, node, RecordDict(), {**cfg.to_mapping(), "stats-min-count": 1})
        return (
            _reply(ctx, "query", {Config.STATS_MIN_COUNT: 1}),
            _reply(ctx, "train", {Config.SERVER_ROUND: 1}, model),
            _reply(ctx, "evaluate", {Config.SERVER_ROUND: 1}, model),
        )

    summary, trained, evaluated = replies(floor=8)  # both splits clear 8: shown as they are
    assert (summary[Statistic.NUM_TRAIN], summary[Statistic.NUM_VAL]) == (34, 8)
    assert trained[Metric.NUM_EXAMPLES] == trained[Metric.WEIGHT] == 34
    assert evaluated[Metric.NUM_EXAMPLES] == evaluated[Metric.WEIGHT] == 8

    summary, trained, evaluated = replies(floor=10)
    assert summary[Statistic.NUM_TRAIN] == summary[Statistic.NUM_VAL] == SUPPRESSED
    assert set(summary[Statistic.LABEL_HISTOGRAM]) == {SUPPRESSED}, "its cells add up to 42"
    assert set(summary[Statistic.INTENSITY_HISTOGRAM]) == {float(SUPPRESSED)}
    assert trained[Metric.NUM_EXAMPLES] == trained[Metric.IMAGES_PER_SECOND] == SUPPRESSED
    assert evaluated[Metric.NUM_EXAMPLES] == SUPPRESSED
    assert trained[Metric.WEIGHT] == evaluated[Metric.WEIGHT] == 10.0, "the floor, not 34 or 8"
    # every mean over its images is a fraction whose denominator is a hidden count
    assert trained[Metric.TRAIN_LOSS] == evaluated[Metric.LOSS] == float(SUPPRESSED)
    assert evaluated["accuracy"] == evaluated["auc"] == float(SUPPRESSED)
    examples = REGISTRY.get_sample_value("medfed_site_training_examples", {"site": "site"})
    assert math.isnan(examples), "the node's gauge shows what was sent"


def test_a_site_whose_counts_are_hidden_trains_a_public_number_of_steps(tmp_path):
    """A chosen global model can turn the number of optimiser steps into a readable count
    (a batch-norm channel whose running variance decays 0.9 per batch read 34.000 from a
    site hiding its 34; how many values the clipping range cut, likewise). A site whose
    counts are hidden draws, with replacement, as many images per epoch as the largest
    hidden site can have: its steps are the same whatever its own count."""
    cfg = tiny_config(task="classification", batch_size=4, stats_min_count=1)  # the node's
    steps = {}
    for images in (12, 39):
        site = generate_site(
            "classification", 0, tmp_path / f"site-{images}", images_per_site=images, image_size=32
        )
        for floor in (10, 1):
            node = {NodeConfig.DATA_PATH: str(site), NodeConfig.MIN_COUNT: floor,
                    NodeConfig.CACHE_DIR: str(tmp_path / f"cache-{images}-{floor}")}  # fmt: skip
            opened = NodeSite(Context(RUN_ID, 5, node, RecordDict(), cfg.to_mapping()))
            epoch = opened.hidden_epoch()
            loader = opened.loader(opened.data.train, train=True, epoch_images=epoch)
            steps[(images, floor)] = (epoch, len(loader), len(opened.data.train))
    hidden = largest_hidden_train(10, cfg.val_fraction)
    assert steps[(12, 10)][:2] == steps[(39, 10)][:2] == (hidden, math.ceil(hidden / 4))
    for images in (12, 39):  # shown (floor 1): the site's own epoch
        epoch, batches, train = steps[(images, 1)]
        assert epoch is None and batches == math.ceil(train / 4)


def test_a_training_message_validates_the_model_it_carries_as_an_evaluation_would(tmp_path):
    """From round 2 on (`separate-evaluation = false`), the training reply carries the
    received model's validation: the metrics an evaluation reply of that model has, hidden
    by the site's one decision the same way; round 1 (the initial model was evaluated on
    its own) and `separate-evaluation = true` carry none."""
    site = generate_site("classification", 0, tmp_path / "site", images_per_site=39, image_size=32)
    cfg = tiny_config(task="classification", local_epochs=1)
    torch.manual_seed(0)
    model = {
        k: v.numpy() for k, v in TASKS["classification"].build_network(cfg).state_dict().items()
    }
    calls = iter(range(100))

    def reply(kind: str, server_round: int, floor: int, **run) -> RecordDict:
        node = {NodeConfig.DATA_PATH: str(site), NodeConfig.MIN_COUNT: floor,
                NodeConfig.CACHE_DIR: str(tmp_path / f"cache-{next(calls)}")}  # fmt: skip
        run_config = {**cfg.to_mapping(), "stats-min-count": 1, **run}
        ctx = Context(RUN_ID, 5, node, RecordDict(), run_config)
        answer = app(incoming(kind, {Config.SERVER_ROUND: server_round}, model), ctx)
        assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
        return answer.content

    for floor in (8, 10):  # the site's validation split (8 images) shown, then hidden
        validation = dict(reply("train", 2, floor)[Record.VALIDATION])
        evaluated = dict(reply("evaluate", 2, floor)[Record.METRICS])
        assert validation == evaluated
    assert validation[Metric.LOSS] == validation[Metric.NUM_EXAMPLES] == SUPPRESSED
    assert Record.VALIDATION not in reply("train", 1, 8)
    assert Record.VALIDATION not in reply("train", 2, 8, **{"separate-evaluation": True})
