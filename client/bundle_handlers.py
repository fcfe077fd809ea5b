"""What a hospital does with each message of a bundle run (task = bundle).

The counterpart of `handlers` for a MONAI bundle: the same messages, the same
reply layout and metric keys, the same mods around them (SecAgg+ masking, DP
clipping, count floors, the audit line), but training and evaluation are the
bundle's own trainer and evaluator (`bundle_engines`) on the site's datalist
(`bundle_data`). Before any of the bundle's configs is run, the node checks
that they hash to what the coordinator holds (`bundle-sha256` in the request).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord

from medfed.client import node_metrics
from medfed.client.approval import check_bundle
from medfed.client.bundle_data import bundle_datalist
from medfed.client.bundle_engines import BundleSite, evaluate_round, train_round
from medfed.client.data.site_paths import resolve_site_path, site_name
from medfed.client.handlers import TrainingClock, pick_device, site_reply
from medfed.client.privacy.disclosure import SiteCounts, remember
from medfed.client.round_request import MalformedRequest, request_config, round_settings
from medfed.client.settings import node_settings, run_config
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.protocol import Config, Metric, Record, Statistic


def open_site(context: Context, msg: Message | None) -> tuple[RunConfig, BundleSite]:
    """The run's config and this node's bundle site; with a training or evaluation `msg`,
    the bundle's configs are checked against the coordinator's hash first."""
    cfg = run_config(context)
    node = node_settings(context)
    if node.data_path is None and node.partition is not None and not cfg.data_root:
        raise ConfigError(
            "config key 'data-root' is empty: task = bundle trains on site folders "
            "(medfed makes no synthetic data for a bundle)"
        )
    path = resolve_site_path(node, cfg)
    bundle = Bundle(cfg.bundle)
    if msg is not None:
        expected = request_config(msg).get(Config.BUNDLE_SHA256)
        if not isinstance(expected, str):
            raise MalformedRequest(f"'{Config.BUNDLE_SHA256}' = {expected!r}: expected a hash")
        bundle.check_hash(expected)
        check_bundle(bundle.sha256)  # the hospital's approval, before any of its code runs
    device = pick_device(node.device or cfg.device)
    site = BundleSite(bundle, site_name(node, path), bundle_datalist(path, cfg), device)
    return cfg, site


def site_counts(site: BundleSite) -> SiteCounts:
    """The site's split sizes, for the filters' one decision on what replies show."""
    return SiteCounts(train=len(site.data.train), val=len(site.data.val))


def received(msg: Message) -> ArrayRecord:
    """The global weights the message carries."""
    arrays = msg.content.array_records.get(Record.ARRAYS)
    if arrays is None:
        raise MalformedRequest(f"the message has no '{Record.ARRAYS}' record")
    return arrays


def train(msg: Message, context: Context) -> Message:
    """`local-epochs` epochs of the bundle's trainer from the received global weights, the
    received model validated first unless the run evaluates in messages of their own."""
    request = round_settings(msg)
    cfg, site = open_site(context, msg)
    folded = cfg.validates_in_training(request.server_round)
    validation = validate(site, received(msg)) if folded else None
    clock = TrainingClock(site.device)
    trained = train_round(site, received(msg), cfg.local_epochs, request.proximal_mu)
    examples = len(site.data.train)
    report = clock.stop(site.name, cfg, request.server_round, examples, trained.loss)
    node_metrics.record_training(report)
    weight = 1.0 if cfg.dp_mode != "off" else float(examples)
    metrics = {
        Metric.TRAIN_LOSS: trained.loss,
        Metric.TRAIN_SECONDS: report.seconds,
        Metric.IMAGES_PER_SECOND: report.images_per_second,
        Metric.NUM_EXAMPLES: examples,
        Metric.GENERATED_IMAGES: 0,
        Metric.WEIGHT: weight,
        Metric.SKIPPED_FILES: 0,  # medfed skips none: the bundle's transforms read the files
    }
    remember(context, site_counts(site))
    reply = site_reply(msg, site.name, metrics, trained.arrays)
    if validation is not None:
        reply.content[Record.VALIDATION] = MetricRecord(validation)
    return reply


def validate(site: BundleSite, arrays: ArrayRecord) -> dict[str, Any]:
    """The bundle evaluator's metrics of `arrays` on this site's held-out split."""
    metrics = evaluate_round(site, arrays)
    metrics[Metric.NUM_EXAMPLES] = len(site.data.val)
    metrics[Metric.WEIGHT] = len(site.data.val)
    metrics[Metric.SKIPPED_FILES] = 0
    return metrics


def evaluate(msg: Message, context: Context) -> Message:
    """The bundle evaluator's metrics (key metric as `key-metric`) and its validation loss."""
    round_settings(msg)
    _, site = open_site(context, msg)
    metrics = validate(site, received(msg))
    remember(context, site_counts(site))
    return site_reply(msg, site.name, metrics)


def query(msg: Message, context: Context) -> Message:
    """This site's split sizes (the bundle's own transforms read its images, so medfed
    sends no label or intensity statistics); the site's decision on its counts holds on the
    way out."""
    _, site = open_site(context, None)
    summary = {Statistic.NUM_TRAIN: len(site.data.train), Statistic.NUM_VAL: len(site.data.val)}
    remember(context, site_counts(site))
    return site_reply(msg, site.name, summary)
