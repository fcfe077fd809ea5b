"""Federated statistics, the coordinator's half: every site's summary side by side before round 0.

The coordinator only receives what each site chose to send: a count the site
hides (below its minimum, the larger of its own floor and `stats-min-count`,
or one a hidden count would follow from) arrives as SUPPRESSED, is recorded
and shown as "hidden" (`hidden_counts`), and each site's minimum is shown
beside its counts; no image or file name leaves a hospital. The hospital's
half is `client/data/site_statistics.py` (what is counted) and
`client/privacy/disclosure.py` (what is hidden).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medfed.server.run.hidden_counts import HIDDEN, is_hidden, shown_count
from medfed.server.run.replies import ReplyCollector, RoundReplies
from medfed.shared_models.protocol import Config, Record, Statistic

SPARK = " ▁▂▃▄▅▆▇█"


def request_summaries(replies: ReplyCollector, node_ids: list[int], min_count: int) -> RoundReplies:
    """Ask every node for its site's summary, asking it to hide counts below `min_count` (a
    site's own floor may be higher)."""
    messages = [
        Message(
            RecordDict({Record.CONFIG: ConfigRecord({Config.STATS_MIN_COUNT: min_count})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    return replies.collect(messages, weighted=False)


def intensity_shape(histogram: list[Any]) -> str:
    """An intensity histogram as a sparkline; "hidden" where the site hid it, "-" if none."""
    if not histogram:
        return "-"
    if any(is_hidden(v) for v in histogram):
        return HIDDEN
    top = max(histogram) or 1.0
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in histogram)


def format_summaries(summaries: dict[str, dict[str, Any]], classes: list[str]) -> list[str]:
    """A fixed-width table: each site's minimum, counts, label histogram, intensity
    percentiles and the histogram's shape."""
    header = (
        f"{'site':<12} {'min':>5} {'train':>6} {'val':>6} "
        + " ".join(f"{c[:10]:>10}" for c in classes)
        + f" {'p1':>8} {'p99':>8}  intensity histogram"
    )
    lines = [
        "site statistics (each site hides the counts below its minimum, and the counts "
        "they would follow from):",
        header,
    ]
    for site, s in sorted(summaries.items()):
        p1, p99 = (
            f"{s[key]:>8.4g}" if key in s else f"{'-':>8}"  # a bundle run's sites send none
            for key in (Statistic.INTENSITY_P1, Statistic.INTENSITY_P99)
        )
        lines.append(
            f"{site:<12} {s.get(Statistic.MIN_COUNT, '-'):>5} "
            f"{shown_count(s[Statistic.NUM_TRAIN]):>6} {shown_count(s[Statistic.NUM_VAL]):>6} "
            + " ".join(f"{shown_count(v):>10}" for v in s.get(Statistic.LABEL_HISTOGRAM, []))
            + f" {p1} {p99}  {intensity_shape(s.get(Statistic.INTENSITY_HISTOGRAM, []))}"
        )
    return lines
