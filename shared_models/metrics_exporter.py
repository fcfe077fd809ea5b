"""The Prometheus exporter of a long-running command, for the metrics its app processes write."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus_client's multiprocess mode: each process writes memory-mapped files here.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def fresh_metrics_dir(directory: Path) -> Path:
    """An empty folder for a new exporter's lifetime (old files would be summed in)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


class MedfedOnly:
    """medfed's metric families from the multiprocess files, and nothing else.

    Other libraries in the same processes use prometheus_client too (Ray writes
    its own metrics into the same folder); they are not ours to export.
    """

    def __init__(self, directory: Path) -> None:
        self.merged = MultiProcessCollector(None, path=str(directory))

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.merged.collect() if family.name.startswith("medfed_"))


def serve_metrics(port: int, directory: Path, host: str = "127.0.0.1") -> None:
    """Serve the merged metrics of every process writing to `directory` (a daemon thread).

    Flower runs the apps in short-lived processes, so medfed uses
    prometheus_client's multiprocess mode instead of a Pushgateway: each app
    process writes to files under `directory` and this one long-lived exporter
    (`medfed simulate`, `medfed node`, `medfed coordinator`) serves their merged
    view at one fixed port. A Pushgateway would keep a dead node's last values
    forever; this needs no extra service.
    """
    registry = CollectorRegistry()
    registry.register(MedfedOnly(directory))
    start_http_server(port, addr=host, registry=registry)


def export_metrics(directory: Path, port: int, host: str, env: dict[str, str]) -> None:
    """Start a fresh exporter for `directory` and point the processes in `env` at it."""
    serve_metrics(port, fresh_metrics_dir(directory), host)
    env[MULTIPROC_ENV] = str(directory)
