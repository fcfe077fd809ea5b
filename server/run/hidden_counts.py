"""How the coordinator records and shows a count a site hid.

A site sends SUPPRESSED (-1) for each count it hides (client/privacy/disclosure).
That is a marker, not a value: averaged with the others it made the global
`num-examples` 10.105 in the demo and -1.0 in a 3D run (issue 23). So the
coordinator records it as "hidden" in metrics.json, from which the report and
every other view are built, and leaves the counts out of its averages across
sites: an average count means nothing, and a total would need the hidden ones.
"Hidden" says no more than that: a count hidden only to protect another is
not below the floor, so it is never shown as "<N".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import MetricRecord, RecordDict

from medfed.shared_models.protocol import SUPPRESSED, Metric, Statistic

HIDDEN = "hidden"
# A training reply's example count, as the coordinator files it per site (the site's
# evaluation reply has its own `num-examples`).
TRAIN_EXAMPLES = "train-examples"
# What a site may hide: reply metrics, and the counts and intensity histogram of its summary.
HIDEABLE = frozenset(
    {
        *Metric.HIDEABLE,
        TRAIN_EXAMPLES,
        Statistic.NUM_TRAIN,
        Statistic.NUM_VAL,
        Statistic.LABEL_HISTOGRAM,
        Statistic.INTENSITY_HISTOGRAM,
    }
)


def is_hidden(value: Any) -> bool:
    """A hidden count as recorded (HIDDEN), or as sent (SUPPRESSED, also in older files)."""
    return value in (HIDDEN, SUPPRESSED)


def hidden_site(values: Mapping[str, Any]) -> bool:
    """Whether a training or evaluation reply comes from a site whose counts are hidden:
    then every metric but the few it still shows (Metric.SHOWN_WHEN_HIDDEN) is a marker."""
    return Metric.NUM_EXAMPLES in values and is_hidden(values[Metric.NUM_EXAMPLES])


def recorded(values: Mapping[str, Any]) -> dict[str, Any]:
    """A site's metrics or summary as the coordinator records them: each hidden count (or
    histogram cell), and every metric of a site whose counts are hidden, HIDDEN;
    everything else as the site sent it."""
    whole_site = hidden_site(values)

    def record(key: str, value: Any) -> Any:
        if whole_site and key not in Metric.SHOWN_WHEN_HIDDEN:
            return [HIDDEN] * len(value) if isinstance(value, list) else HIDDEN
        if key not in HIDEABLE:
            return value
        if isinstance(value, list):
            return [HIDDEN if is_hidden(v) else v for v in value]
        return HIDDEN if is_hidden(value) else value

    return {key: record(key, value) for key, value in values.items()}


def shown_count(value: Any) -> str:
    """A count as the coordinator shows it: the number, or "hidden"."""
    return HIDDEN if is_hidden(value) else str(value)


def mean_of_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """The weighted mean of each metric over the sites that show it: the counts a site may
    hide are left out, and so is every metric of a site whose counts are hidden, so that no
    -1 marker is ever averaged in. (Flower's `aggregate_metricrecords` averages every key
    over every reply; this is its weighted mean, key by key, over the values shown.)"""
    sums: dict[str, Any] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weighting_metric_name])
        hidden = hidden_site(metrics)
        for key, value in metrics.items():
            if key == weighting_metric_name or key in Metric.HIDEABLE:
                continue
            if hidden and key not in Metric.SHOWN_WHEN_HIDDEN:
                continue
            scaled = [v * weight for v in value] if isinstance(value, list) else value * weight
            if key in sums and isinstance(value, list):
                scaled = [a + b for a, b in zip(sums[key], scaled, strict=True)]
            elif key in sums:
                scaled = sums[key] + scaled
            sums[key], weights[key] = scaled, weights.get(key, 0.0) + weight
    return MetricRecord(
        {
            key: [v / weights[key] for v in total]
            if isinstance(total, list)
            else total / weights[key]
            for key, total in sums.items()
        }
    )
