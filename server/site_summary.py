"""Federated statistics, the coordinator's half: every site's summary side by side before round 0.

The coordinator only receives what each site chose to send: counts below the
site's minimum (the larger of its own floor and `stats-min-count`) arrive as
SUPPRESSED and are shown as "<N" with the site's N; no image or file
name leaves a hospital. The hospital's half is `client/data/site_summary.py`
(what is counted) and `client/privacy/filters.py` (what is suppressed).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medfed.server.exchange import Exchange, RoundReplies
from medfed.shared_models.protocol import SUPPRESSED, Config, Record, Statistic

SPARK = " ▁▂▃▄▅▆▇█"


def request_summaries(exchange: Exchange, node_ids: list[int], min_count: int) -> RoundReplies:
    """Ask every node for its site's summary, with counts below `min_count` suppressed."""
    messages = [
        Message(
            RecordDict({Record.CONFIG: ConfigRecord({Config.STATS_MIN_COUNT: min_count})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    return exchange.collect(messages, weighted=False)


def shown_count(value: Any, minimum: int) -> str:
    """A count as the coordinator may show it: "<N" where the site suppressed it."""
    return f"<{int(minimum)}" if value == SUPPRESSED else str(value)


def format_summaries(
    summaries: dict[str, dict[str, Any]], classes: list[str], min_count: int
) -> list[str]:
    """A fixed-width table: counts, label histogram, intensity percentiles and shape."""

    header = (
        f"{'site':<12} {'train':>6} {'val':>5} "
        + " ".join(f"{c[:10]:>10}" for c in classes)
        + f" {'p1':>8} {'p99':>8}  intensity histogram"
    )
    lines = ["site statistics (counts below the minimum are suppressed at the site):", header]
    for site, s in sorted(summaries.items()):
        count = partial(shown_count, minimum=s.get(Statistic.MIN_COUNT, min_count))
        histogram = s.get(Statistic.INTENSITY_HISTOGRAM, [])
        if not histogram:
            shape = "-"
        elif histogram[0] >= 0:
            top = max(histogram) or 1.0
            shape = "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in histogram)
        else:
            shape = "(suppressed)"
        p1, p99 = (
            f"{s[key]:>8.4g}" if key in s else f"{'-':>8}"  # a bundle run's sites send none
            for key in (Statistic.INTENSITY_P1, Statistic.INTENSITY_P99)
        )
        lines.append(
            f"{site:<12} {count(s[Statistic.NUM_TRAIN]):>6} {count(s[Statistic.NUM_VAL]):>5} "
            + " ".join(f"{count(v):>10}" for v in s.get(Statistic.LABEL_HISTOGRAM, []))
            + f" {p1} {p99}  {shape}"
        )
    return lines
