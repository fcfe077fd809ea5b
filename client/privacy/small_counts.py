"""Small-count suppression: a filter on a site's statistics reply, outside the code that counts.

NVIDIA FLARE applies `min_count_check` as a filter outside the learner; here
the query handler computes the site's summary in the clear and this mod, on
the reply's way out, replaces every count of images below the minimum by
SUPPRESSED, and the intensity histogram too when the site holds fewer images
than the minimum. A rare class or a tiny site is never disclosed exactly.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from medfed.shared_models.protocol import SUPPRESSED, Config, Record, Statistic


def suppress_small_counts(summary: MetricRecord, min_count: int) -> None:
    """Replace, in place, every image count below `min_count` by SUPPRESSED."""
    images = int(summary[Statistic.NUM_TRAIN]) + int(summary[Statistic.NUM_VAL])

    def guard(count: int) -> int:
        return count if count >= min_count else SUPPRESSED

    for key in Statistic.COUNTS:
        value = summary[key]
        summary[key] = [guard(int(v)) for v in value] if isinstance(value, list) else guard(value)
    if images < min_count:
        bins = len(summary[Statistic.INTENSITY_HISTOGRAM])
        summary[Statistic.INTENSITY_HISTOGRAM] = [float(SUPPRESSED)] * bins


def small_count_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Suppress the small counts of the summary the query handler produced."""
    reply = call_next(msg, context)
    if not reply.has_error():
        min_count = int(msg.content[Record.CONFIG][Config.STATS_MIN_COUNT])
        suppress_small_counts(reply.content[Record.METRICS], min_count)
    return reply
