"""The site's privacy filters on replies: DP clipping of the update, small counts.

NVIDIA FLARE applies its privacy filters (DP, `min_count_check`) outside the
learner; here they are Flower mods around the handlers, so the code that
trains or counts stays plain and the policy is applied on the way out.

- `dp_clipping_mod`: the update is clipped to the coordinator's norm with
  Flower's own fixed or adaptive clipping mod (a run with `dp.mode = "client"`).
  It sits inside `secagg_mod`: clipped, then masked.
- `small_count_mod` (statistics) and `count_floor_mod` (training and
  evaluation replies): every count a reply carries is written from the
  site's one disclosure decision (`disclosure`), so no reply shows what
  another hides.

The floor is the node's (`--node-config min-count`, set by `medfed node
start --min-count`), raised by the run's `stats-min-count`: the coordinator
may ask for more suppression, never less, and the same floor holds for every
reply kind.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.privacy.disclosure import Disclosure, SiteCounts, decide, recall, small
from medfed.client.round_request import integer, request_config
from medfed.client.settings import node_settings, run_config
from medfed.shared_models.config import INT_RANGES
from medfed.shared_models.protocol import (
    SUPPRESSED,
    Config,
    Metric,
    Record,
    Statistic,
)

MAX_STATS_MIN_COUNT = INT_RANGES["stats_min_count"][1]


def site_floor(context: Context) -> int:
    """The smallest count this node reveals in any reply of the run: its `min-count`, or
    the run's `stats-min-count` where that is larger."""
    node = node_settings(context).min_count
    return max(node, run_config(context, validate=False).stats_min_count)


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip (reply arrays - received arrays) to the coordinator's norm, as Flower's mods do."""
    config = msg.content.config_records.get(Record.CONFIG)
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or config is None
        or KEY_CLIPPING_NORM not in config
    ):
        return call_next(msg, context)
    adaptive = run_config(context).dp_adaptive
    flower_mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    return flower_mod(msg, context, call_next)


def disclose_summary(summary: MetricRecord, counts: SiteCounts | None, floor: int) -> None:
    """In place: the summary's counts as the site's decision shows them, the intensity
    histogram hidden with the split, and the minimum that held (so "hidden" is read
    against it). Without the handler's counts, every count is hidden."""
    cells = len(summary.get(Statistic.LABEL_HISTOGRAM, []))
    shown = decide(counts, floor) if counts is not None else None
    if shown is None or len(shown.histogram) != cells:
        shown = Disclosure.hiding_everything(floor, cells)
    summary[Statistic.NUM_TRAIN], summary[Statistic.NUM_VAL] = shown.train, shown.val
    if cells:  # a bundle run's sites send counts only
        summary[Statistic.LABEL_HISTOGRAM] = list(shown.histogram)
    if not shown.split_shown and Statistic.INTENSITY_HISTOGRAM in summary:
        bins = len(summary[Statistic.INTENSITY_HISTOGRAM])
        summary[Statistic.INTENSITY_HISTOGRAM] = [float(SUPPRESSED)] * bins
    summary[Statistic.MIN_COUNT] = floor


def small_count_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The summary the query handler produced, its counts under the larger of the site's
    floor and the coordinator's request (read first: a malformed request is refused
    before the site is summarised)."""
    asked = integer(request_config(msg), Config.STATS_MIN_COUNT, 1, MAX_STATS_MIN_COUNT)
    recall(context)  # counts stated for an earlier message are not this one's
    reply = call_next(msg, context)
    counts = recall(context)
    if not reply.has_error():
        floor = max(site_floor(context), asked)
        disclose_summary(reply.content[Record.METRICS], counts, floor)
    return reply


def disclose_reply(
    metrics: MetricRecord, shown: Disclosure, training: bool, weight_is_count: bool
) -> None:
    """In place: a training or evaluation reply's counts as the site's decision shows them.

    The example count is the split's (train, or val for an evaluation). With it
    hidden, so is what gives it away: the throughput (images per second x the
    seconds), the generated images (a public ratio x train), every metric that is
    a mean over the site's images (accuracy k/n, recall, Dice, the losses: exact
    fractions whose denominators a chosen model, or enough honest rounds, reveal)
    and a count weight, which becomes the floor (a public constant that keeps it
    positive; under DP every training weight is 1, not a count). Skipped files and
    generated images are also hidden below the floor on their own.
    """
    example_count = shown.train if training else shown.val
    metrics[Metric.NUM_EXAMPLES] = example_count
    if not shown.split_shown:
        for key in [k for k in metrics if k not in Metric.SHOWN_WHEN_HIDDEN]:
            value = metrics[key]
            hidden = float(SUPPRESSED)
            metrics[key] = [hidden] * len(value) if isinstance(value, list) else hidden
        if Metric.IMAGES_PER_SECOND in metrics:
            metrics[Metric.IMAGES_PER_SECOND] = float(SUPPRESSED)
        if Metric.GENERATED_IMAGES in metrics:
            metrics[Metric.GENERATED_IMAGES] = SUPPRESSED
        if weight_is_count and Metric.WEIGHT in metrics:
            metrics[Metric.WEIGHT] = float(shown.floor)
    for key in (Metric.SKIPPED_FILES, Metric.GENERATED_IMAGES):
        value = metrics.get(key)
        if isinstance(value, int | float) and small(int(value), shown.floor):
            metrics[key] = SUPPRESSED


def count_floor_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The site's decision on the counts in a training or evaluation reply."""
    recall(context)  # counts stated for an earlier message are not this one's
    reply = call_next(msg, context)
    counts = recall(context)
    if reply.has_error() or Record.METRICS not in reply.content.metric_records:
        return reply
    floor = site_floor(context)
    shown = decide(counts, floor) if counts is not None else Disclosure.hiding_everything(floor)
    training = msg.metadata.message_type == MessageType.TRAIN
    # a training weight under DP is 1 for everyone, not a count; an evaluation weight is
    dp = run_config(context, validate=False).dp_mode != "off"
    metrics = reply.content[Record.METRICS]
    disclose_reply(metrics, shown, training, weight_is_count=not training or not dp)
    validation = reply.content.metric_records.get(Record.VALIDATION)
    if validation is not None:  # the received model's validation: an evaluation reply's
        disclose_reply(validation, shown, training=False, weight_is_count=True)
    return reply
