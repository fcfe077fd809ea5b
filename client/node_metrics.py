"""Hospital-side metrics: what a site's own dashboard shows about its node.

Written from the ClientApp's short-lived processes through prometheus_client's
multiprocess files, served by the node's exporter (`metrics_exporter.serve_metrics`);
labels are the site and task only, never file or patient names. The
consortium's Prometheus may scrape a node (deploy/prometheus), so the count
gauges show a training reply's counts as they left the site: a count the site
hides is NaN there too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from medfed.shared_models.protocol import SUPPRESSED, Metric

TRAINING_DURATION = Histogram(
    "medfed_site_training_duration_seconds",
    "Local training time per round",
    ["site", "task"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)
IMAGES_PER_SECOND = Gauge(
    "medfed_site_training_images_per_second",
    "Local training throughput",
    ["site"],
    multiprocess_mode="mostrecent",
)
TRAIN_LOSS = Gauge(
    "medfed_site_train_loss",
    "Mean local training loss of the last round",
    ["site", "task"],
    multiprocess_mode="mostrecent",
)
LOCAL_VALIDATION = Gauge(
    "medfed_site_local_validation_metric",
    "The global model's validation metric on this site's images",
    ["site", "task", "metric"],
    multiprocess_mode="mostrecent",
)
EXAMPLES = Gauge(
    "medfed_site_training_examples",
    "Training images used in the last round",
    ["site"],
    multiprocess_mode="mostrecent",
)
SKIPPED_FILES = Gauge(
    "medfed_site_skipped_files",
    "Files skipped as unusable",
    ["site"],
    multiprocess_mode="mostrecent",
)
SENT_BYTES = Counter("medfed_site_sent_bytes", "Model bytes this site sent", ["site"])
ROUNDS_TRAINED = Counter("medfed_site_rounds_trained", "Rounds this site trained", ["site"])
LAST_ROUND = Gauge(
    "medfed_site_last_round",
    "Last round this site took part in",
    ["site"],
    multiprocess_mode="mostrecent",
)
DEVICE = Gauge(
    "medfed_site_device_info",
    "Device the site trains on (value 1)",
    ["site", "device"],
    multiprocess_mode="mostrecent",
)
GPU_MEMORY_PEAK = Gauge(
    "medfed_site_gpu_memory_peak_bytes",
    "Peak CUDA memory in the last round (0 on CPU)",
    ["site"],
    multiprocess_mode="mostrecent",
)


@dataclass(frozen=True)
class TrainingReport:
    """One round of local training, as this site's dashboard shows it."""

    site: str
    task: str
    server_round: int
    seconds: float
    images: int  # images seen: examples x local epochs
    loss: float
    examples: int
    device: str
    gpu_peak_bytes: int  # 0 on the CPU

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def record_training(report: TrainingReport) -> None:
    """A round of local training (its loss and counts, as sent: `record_sent`)."""
    TRAINING_DURATION.labels(report.site, report.task).observe(report.seconds)
    ROUNDS_TRAINED.labels(report.site).inc()
    LAST_ROUND.labels(report.site).set(report.server_round)
    DEVICE.labels(report.site, report.device).set(1)
    GPU_MEMORY_PEAK.labels(report.site).set(report.gpu_peak_bytes)


def record_sent(site: str, task: str, training: bool, metrics: Mapping[str, object]) -> None:
    """The node's gauges from a training reply, or an evaluation of the global model, as
    it was sent: a value the site hid (SUPPRESSED) shows as NaN. The consortium's
    Prometheus may scrape these gauges (deploy/), so they show no more than the reply."""

    def shown(value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return math.nan if value == SUPPRESSED else float(value)

    if not training:
        for name, value in metrics.items():
            if name not in Metric.BOOKKEEPING and shown(value) is not None:
                LOCAL_VALIDATION.labels(site, task, name).set(shown(value))
        return
    for gauge, key in (
        (EXAMPLES, Metric.NUM_EXAMPLES),
        (SKIPPED_FILES, Metric.SKIPPED_FILES),
        (IMAGES_PER_SECOND, Metric.IMAGES_PER_SECOND),
    ):
        if shown(metrics.get(key)) is not None:
            gauge.labels(site).set(shown(metrics.get(key)))
    if shown(metrics.get(Metric.TRAIN_LOSS)) is not None:
        TRAIN_LOSS.labels(site, task).set(shown(metrics.get(Metric.TRAIN_LOSS)))


def model_bytes_sent(site: str, count: int) -> None:
    """Model bytes that left the site (after masking: what was actually sent)."""
    SENT_BYTES.labels(site).inc(count)
