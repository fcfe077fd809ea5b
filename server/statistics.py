"""Federated statistics: every site's summary, side by side, before round 0.

The coordinator only receives what each site chose to send (counts below the
minimum arrive as -1 and are shown as "<N"); no image or file name leaves a
hospital.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfed.server.messaging import send_and_receive

SPARK = " ▁▂▃▄▅▆▇█"


def request_statistics(
    grid: Grid, node_ids: list[int], min_count: int, timeout: float
) -> list[Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"stats-min-count": min_count})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    return send_and_receive(grid, messages, timeout)


def format_statistics(
    stats: dict[str, dict[str, Any]], classes: list[str], min_count: int
) -> list[str]:
    """A fixed-width table: counts, label histogram, intensity percentiles and shape."""

    def count(value: Any) -> str:
        return f"<{min_count}" if value == -1 else str(value)

    header = (
        f"{'site':<12} {'train':>6} {'val':>5} "
        + " ".join(f"{c[:10]:>10}" for c in classes)
        + f" {'p1':>8} {'p99':>8}  intensity histogram"
    )
    lines = ["site statistics (counts below the minimum are suppressed at the site):", header]
    for site, s in sorted(stats.items()):
        histogram = s.get("intensity-histogram", [])
        if histogram and histogram[0] >= 0:
            top = max(histogram) or 1.0
            shape = "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in histogram)
        else:
            shape = "(suppressed)"
        lines.append(
            f"{site:<12} {count(s['num-train']):>6} {count(s['num-val']):>5} "
            + " ".join(f"{count(v):>10}" for v in s["label-histogram"])
            + f" {s['intensity-p1']:>8.4g} {s['intensity-p99']:>8.4g}  {shape}"
        )
    return lines
