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
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

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


def recorded(values: Mapping[str, Any]) -> dict[str, Any]:
    """A site's metrics or summary as the coordinator records them: each hidden count (or
    histogram cell) HIDDEN, everything else as the site sent it."""

    def record(key: str, value: Any) -> Any:
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
    """Flower's weighted mean of the replies' metrics (`aggregate_metricrecords`) with the
    counts a site may hide left out, so that no -1 marker is ever averaged in."""
    kept = [
        RecordDict(
            {
                name: MetricRecord({k: v for k, v in m.items() if k not in Metric.HIDEABLE})
                for name, m in record.metric_records.items()
            }
        )
        for record in records
    ]
    return aggregate_metricrecords(kept, weighting_metric_name)
