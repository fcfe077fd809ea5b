"""Hospital-side metrics: what a site's own dashboard shows about its node.

Written from the ClientApp's short-lived processes through prometheus_client's
multiprocess files (see medfed.server.telemetry for why); labels are the site
and task only — never file or patient names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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


def record_training(
    site: str,
    task: str,
    seconds: float,
    images: int,
    loss: float,
    examples: int,
    skipped: int,
    sent_bytes: int,
    server_round: int,
    device: str,
    gpu_peak_bytes: int,
) -> None:
    TRAINING_DURATION.labels(site, task).observe(seconds)
    IMAGES_PER_SECOND.labels(site).set(images / seconds if seconds > 0 else 0.0)
    TRAIN_LOSS.labels(site, task).set(loss)
    EXAMPLES.labels(site).set(examples)
    SKIPPED_FILES.labels(site).set(skipped)
    SENT_BYTES.labels(site).inc(sent_bytes)
    ROUNDS_TRAINED.labels(site).inc()
    LAST_ROUND.labels(site).set(server_round)
    DEVICE.labels(site, device).set(1)
    GPU_MEMORY_PEAK.labels(site).set(gpu_peak_bytes)


def record_evaluation(site: str, task: str, metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if name != "num-examples":
            LOCAL_VALIDATION.labels(site, task, name).set(value)
