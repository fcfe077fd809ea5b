"""The site's privacy filters on replies: DP clipping of the update, small counts.

NVIDIA FLARE applies its privacy filters (DP, `min_count_check`) outside the
learner; here they are Flower mods around the handlers, so the code that
trains or counts stays plain and the policy is applied on the way out.

- `dp_clipping_mod`: the update is clipped to the coordinator's norm with
  Flower's own fixed or adaptive clipping mod (a run with `dp.mode = "client"`).
  It sits inside `secagg_mod`: clipped, then masked.
- `small_count_mod`: a site's summary never shows a count of images below
  the site's own floor.
- `count_floor_mod`: the counts in training and evaluation replies obey the
  same floor.

The floor is the node's (`--node-config min-count`, set by `medfed node
start --min-count`): the coordinator may ask for more suppression, never less.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.node_settings import NodeSettings
from medfed.client.round_request import integer, request_config
from medfed.shared_models.config import INT_RANGES, RunConfig
from medfed.shared_models.protocol import (
    SUPPRESSED,
    Config,
    Metric,
    Record,
    Statistic,
)

MAX_STATS_MIN_COUNT = INT_RANGES["stats_min_count"][1]


def site_floor(context: Context) -> int:
    """The smallest count of images this node ever reveals (node config `min-count`)."""
    return NodeSettings.from_mapping(context.node_config).min_count


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip (reply arrays - received arrays) to the coordinator's norm, as Flower's mods do."""
    config = msg.content.config_records.get(Record.CONFIG)
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or config is None
        or KEY_CLIPPING_NORM not in config
    ):
        return call_next(msg, context)
    adaptive = RunConfig.from_mapping(context.run_config).dp_adaptive
    flower_mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    return flower_mod(msg, context, call_next)


def suppress_small_counts(summary: MetricRecord, min_count: int) -> None:
    """Replace, in place, every image count below `min_count` by SUPPRESSED, and say which
    minimum was applied (the coordinator's "<N" is then true whatever the site's floor)."""
    images = int(summary[Statistic.NUM_TRAIN]) + int(summary[Statistic.NUM_VAL])
    summary[Statistic.MIN_COUNT] = min_count
    split = [int(summary[Statistic.NUM_TRAIN]), int(summary[Statistic.NUM_VAL])]
    train_val = hide_small(split, min_count)
    summary[Statistic.NUM_TRAIN], summary[Statistic.NUM_VAL] = train_val
    if Statistic.LABEL_HISTOGRAM in summary:  # a bundle run's sites send counts only
        summary[Statistic.LABEL_HISTOGRAM] = hide_small(
            [int(v) for v in summary[Statistic.LABEL_HISTOGRAM]], min_count
        )
    if images < min_count and Statistic.INTENSITY_HISTOGRAM in summary:
        bins = len(summary[Statistic.INTENSITY_HISTOGRAM])
        summary[Statistic.INTENSITY_HISTOGRAM] = [float(SUPPRESSED)] * bins


def hide_small(counts: list[int], min_count: int) -> list[int]:
    """`counts` with every count below `min_count` SUPPRESSED, and, when any is, enough of
    the others too that no hidden count follows from a total (complementary suppression).

    Counts that add up to a known total (train + val = images; a classification
    histogram = images) would give one hidden cell away by subtraction. So at
    least two cells are hidden, holding at least `min_count` between them: the
    smallest shown ones are added until that holds.
    """
    shown = [c if c >= min_count else SUPPRESSED for c in counts]
    hidden = [i for i, c in enumerate(shown) if c == SUPPRESSED]
    if not hidden:
        return shown
    remaining = sorted((c, i) for i, c in enumerate(shown) if c != SUPPRESSED)
    while remaining and (len(hidden) < 2 or sum(counts[i] for i in hidden) < min_count):
        _, index = remaining.pop(0)
        shown[index] = SUPPRESSED
        hidden.append(index)
    return shown


def small_count_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Suppress the small counts of the summary the query handler produced, below the
    larger of the site's floor and the coordinator's request (read first: a malformed
    request is refused before the site is summarised)."""
    asked = integer(request_config(msg), Config.STATS_MIN_COUNT, 1, MAX_STATS_MIN_COUNT)
    reply = call_next(msg, context)
    if not reply.has_error():
        suppress_small_counts(reply.content[Record.METRICS], max(site_floor(context), asked))
    return reply


def apply_count_floor(metrics: MetricRecord, floor: int, weight_is_count: bool) -> None:
    """In place: counts below the floor become SUPPRESSED, a count weight below it the floor.

    The weight must stay positive to be averaged by, so it is raised instead;
    with the example count suppressed, the training throughput (images per
    second, with the seconds) would give it away, so it goes too.
    """
    for key in Metric.COUNTS:
        value = metrics.get(key)
        if isinstance(value, int | float) and 0 < value < floor:
            metrics[key] = SUPPRESSED
            if key == Metric.NUM_EXAMPLES and Metric.IMAGES_PER_SECOND in metrics:
                metrics[Metric.IMAGES_PER_SECOND] = float(SUPPRESSED)
    weight = metrics.get(Metric.WEIGHT)
    if weight_is_count and isinstance(weight, int | float) and 0 < weight < floor:
        metrics[Metric.WEIGHT] = float(floor)


def count_floor_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The site's floor on the counts in a training or evaluation reply."""
    reply = call_next(msg, context)
    if reply.has_error() or Record.METRICS not in reply.content.metric_records:
        return reply
    # a training weight under DP is 1 for everyone, not a count; an evaluation weight is
    dp = RunConfig.from_mapping(context.run_config, validate=False).dp_mode != "off"
    weight_is_count = msg.metadata.message_type == MessageType.EVALUATE or not dp
    apply_count_floor(reply.content[Record.METRICS], site_floor(context), weight_is_count)
    return reply
