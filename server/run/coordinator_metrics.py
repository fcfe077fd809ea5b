"""Coordinator metrics for Prometheus, updated as the round loop progresses.

The ServerApp runs in a short-lived process, so its values go to
prometheus_client's multiprocess files and the long-lived exporter of
`metrics_exporter.serve_metrics` serves them. Counters and histograms add up across
processes, so they survive restarts; gauges report the most recently
written value. Labels stay low-cardinality: run id, task, site, metric
name, state, and the cross-site matrix's model (global or a site name).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from medfed.shared_models.protocol import Metric

ROUND_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Reply metrics that are no quality of the model (counts, a site may hide, among them).
NOT_QUALITY = frozenset({*Metric.BOOKKEEPING, *Metric.HIDEABLE})

CURRENT_ROUND = Gauge(
    "medfed_current_round",
    "Round the coordinator is in (0: initial eval)",
    ["run", "task"],
    multiprocess_mode="mostrecent",
)
ROUNDS_COMPLETED = Counter("medfed_rounds_completed", "Federated rounds completed", ["run", "task"])
ROUND_DURATION = Histogram(
    "medfed_round_duration_seconds", "Wall time of one round", ["task"], buckets=ROUND_BUCKETS
)
HOSPITALS = Gauge(
    "medfed_hospitals",
    "Hospitals in the last round by state (connected, sampled, replied, failed)",
    ["run", "state"],
    multiprocess_mode="mostrecent",
)
GLOBAL_VALIDATION = Gauge(
    "medfed_global_validation_metric",
    "Aggregated validation metric of the global model",
    ["run", "task", "metric"],
    multiprocess_mode="mostrecent",
)
GLOBAL_TRAIN_LOSS = Gauge(
    "medfed_global_train_loss",
    "Aggregated local training loss",
    ["run", "task"],
    multiprocess_mode="mostrecent",
)
SITE_VALIDATION = Gauge(
    "medfed_site_validation_metric",
    "Each hospital's validation metric of the global model, as reported to the coordinator",
    ["run", "task", "site", "metric"],
    multiprocess_mode="mostrecent",
)
CROSS_SITE = Gauge(
    "medfed_cross_site_metric",
    "Headline validation metric of each model (global, or a site's last local model) on each "
    "site's validation split, from the cross-site evaluation at the end of a run",
    ["run", "task", "model", "site", "metric"],
    multiprocess_mode="mostrecent",
)
RECEIVED_BYTES = Counter("medfed_received_bytes", "Model bytes received from hospitals", ["run"])
SENT_BYTES = Counter("medfed_sent_bytes", "Model bytes sent to hospitals", ["run"])
AGGREGATION_DURATION = Histogram(
    "medfed_aggregation_duration_seconds",
    "Time to check and aggregate one round's updates",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
)
CHECKPOINT_ROUND = Gauge(
    "medfed_last_checkpoint_round",
    "Round of the last checkpoint",
    ["run"],
    multiprocess_mode="mostrecent",
)
CHECKPOINT_TIME = Gauge(
    "medfed_last_checkpoint_timestamp_seconds",
    "Unix time of the last checkpoint",
    ["run"],
    multiprocess_mode="mostrecent",
)
SECAGG_STAGE_DURATION = Histogram(
    "medfed_secagg_stage_duration_seconds",
    "Wall time of one secure-aggregation stage (advertise, share, upload, unmask)",
    ["task", "stage"],
    buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
SECAGG_DROPOUTS = Counter(
    "medfed_secagg_dropouts",
    "Hospitals that dropped out of a secure-aggregation round, by stage",
    ["run", "stage"],
)
DP_EPSILON = Gauge(
    "medfed_dp_epsilon",
    "Differential-privacy budget spent so far (epsilon at the configured delta)",
    ["run", "task"],
    multiprocess_mode="mostrecent",
)


class RoundTelemetry:
    """Updates the coordinator metrics as the round loop progresses."""

    def __init__(self, run_id: int, task: str) -> None:
        self.run, self.task = str(run_id), task

    def round_started(self, server_round: int) -> None:
        CURRENT_ROUND.labels(self.run, self.task).set(server_round)

    def traffic(self, sent: int, received: int) -> None:
        SENT_BYTES.labels(self.run).inc(sent)
        RECEIVED_BYTES.labels(self.run).inc(received)

    def aggregated(self, seconds: float) -> None:
        AGGREGATION_DURATION.labels(self.task).observe(seconds)

    def secure_round(self, stage_seconds: dict[str, float], dropped_at: list[str]) -> None:
        for stage, seconds in stage_seconds.items():
            SECAGG_STAGE_DURATION.labels(self.task, stage).observe(seconds)
        for stage in dropped_at:
            SECAGG_DROPOUTS.labels(self.run, stage).inc()

    def privacy_spent(self, epsilon: float) -> None:
        DP_EPSILON.labels(self.run, self.task).set(epsilon)

    def checkpointed(self, server_round: int, timestamp: float) -> None:
        CHECKPOINT_ROUND.labels(self.run).set(server_round)
        CHECKPOINT_TIME.labels(self.run).set(timestamp)

    def round_finished(
        self,
        server_round: int,
        seconds: float,
        counts: dict[str, int],
        global_metrics: dict[str, float],
        site_validation: dict[str, dict[str, Any]],
    ) -> None:
        """A finished round: its duration, hospital counts and validation metrics.

        `site_validation` holds each hospital's evaluation reply only: what it
        reported about training (throughput, generated images) is not a
        validation metric of the model.
        """
        if server_round > 0:
            ROUNDS_COMPLETED.labels(self.run, self.task).inc()
        ROUND_DURATION.labels(self.task).observe(seconds)
        for state, count in counts.items():
            HOSPITALS.labels(self.run, state).set(count)
        for name, value in global_metrics.items():
            if name == Metric.TRAIN_LOSS:
                GLOBAL_TRAIN_LOSS.labels(self.run, self.task).set(value)
            elif name not in NOT_QUALITY:
                GLOBAL_VALIDATION.labels(self.run, self.task, name).set(value)
        for site, metrics in site_validation.items():
            for name, value in metrics.items():  # a hidden value ("hidden") sets no sample
                if name not in NOT_QUALITY and isinstance(value, int | float):
                    SITE_VALIDATION.labels(self.run, self.task, site, name).set(value)

    def cross_site(self, metric: str, values: dict[str, dict[str, float | None]]) -> None:
        """The cross-site matrix (model -> site -> value); a missing cell sets no sample."""
        for model, row in values.items():
            for site, value in row.items():
                if value is not None:
                    CROSS_SITE.labels(self.run, self.task, model, site, metric).set(value)
