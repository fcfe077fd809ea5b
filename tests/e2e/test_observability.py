"""Prometheus metrics: real exporter, real Prometheus server, promtool, restarts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from medfed.shared_models.metrics_exporter import serve_metrics
from medfed.shared_models.supervision import free_port
from tests.conftest import SHOWN

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TINY = ["-c", "image-size=32", "-c", "model-width=4", "-c", "model-depth=2", *SHOWN]


def _scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def _query(port: int, promql: str) -> list[dict]:
    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql})
    response.raise_for_status()
    return response.json()["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_a_running_simulation(tmp_path):
    metrics_port, prom_port = free_port(), free_port()
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "medfed-simulation", "static_configs": [
                  {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    simulation = subprocess.Popen(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--rounds", "2", "--sites", "3",
         "--images-per-site", "20", "--out", str(tmp_path / "run"),
         "--metrics-port", str(metrics_port), "--metrics-linger", "6", *TINY,
         # with secure aggregation and DP on, their stage, dropout and budget metrics appear too
         "-c", "secure-aggregation=true", "-c", "dp.mode=client", "-c", "dp.noise-multiplier=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        final = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and simulation.poll() is None:
            text = _scrape(metrics_port)
            if re.search(r"^medfed_rounds_completed_total\{.*\} 2\.0$", text, re.M):
                final = text
                break
            time.sleep(0.5)
        assert final, "the exporter never showed 2 completed rounds"
        time.sleep(3)  # Prometheus scrapes every second
        output, _ = simulation.communicate(timeout=120)
        assert simulation.returncode == 0, output

        (tmp_path / "scrape.prom").write_text(final)
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=final, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

        rounds = _query(prom_port, "max_over_time(medfed_rounds_completed_total[10m])")
        assert [float(r["value"][1]) for r in rounds] == [2.0]
        sites = _query(prom_port, "max_over_time(medfed_site_rounds_trained_total[10m])")
        assert sorted(r["metric"]["site"] for r in sites) == ["site-0", "site-1", "site-2"]
        assert all(float(r["value"][1]) == 2.0 for r in sites)
        dice = _query(
            prom_port, 'last_over_time(medfed_site_validation_metric{metric="dice"}[10m])'
        )
        assert len(dice) == 3 and all("pid" not in r["metric"] for r in dice)

        stages = _query(
            prom_port,
            "max_over_time(medfed_secagg_stage_duration_seconds_count[10m])",
        )
        # round 2's keys and shares rode with round 1's upload and unmask
        assert {r["metric"]["stage"]: float(r["value"][1]) for r in stages} == {
            "advertise": 1.0, "share": 1.0, "upload": 2.0, "unmask": 2.0,
        }  # fmt: skip
        epsilon = _query(prom_port, "last_over_time(medfed_dp_epsilon[10m])")
        spent = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
        per_round = [r["global"]["dp-epsilon"] for r in spent[1:]]
        assert 0 < per_round[0] < per_round[1]
        assert [float(r["value"][1]) for r in epsilon] == [pytest.approx(per_round[1])]
    finally:
        for process in (simulation, prometheus):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


RECORD = """
import sys
from medfed.client import node_metrics
from medfed.server.run.coordinator_metrics import RoundTelemetry
round_ = int(sys.argv[1])
report = node_metrics.TrainingReport(
    site="site-0", task="segmentation", server_round=round_, seconds=2.0, images=40,
    loss=0.5 / round_, examples=40, device="cpu", gpu_peak_bytes=0,
)
node_metrics.record_training(report)
# the counts as sent: round 3's reply hid its example count
sent = {"num-examples": 40 if round_ < 3 else -1, "train-loss": 0.5 / round_}
node_metrics.record_sent("site-0", "segmentation", True, sent)
node_metrics.model_bytes_sent("site-0", 1000)
RoundTelemetry(7, "segmentation").round_finished(
    round_, 3.0, {"replied": 1}, {"dice": 0.1 * round_}, {})
"""


def test_counters_survive_app_process_restarts(tmp_path):
    """Three separate processes (as Flower starts per round) write; one exporter merges."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
    for round_ in (1, 2, 3):
        subprocess.run([sys.executable, "-c", RECORD, str(round_)], env=env, check=True)
    port = free_port()
    serve_metrics(port, directory)
    text = _scrape(port)
    assert re.findall(
        r"^medfed_site_rounds_trained_total\{site=\"site-0\"\} (\S+)$", text, re.M
    ) == ["3.0"]
    assert re.findall(r"^medfed_rounds_completed_total\{.*\} (\S+)$", text, re.M) == ["3.0"]
    assert re.findall(r'^medfed_site_sent_bytes_total\{site="site-0"\} (\S+)$', text, re.M) == [
        "3000.0"
    ]
    # gauges: one series, the value of the most recent process
    assert re.findall(r"^medfed_site_train_loss\{.*\} (\S+)$", text, re.M) == [str(0.5 / 3)]
    assert re.findall(r"^medfed_site_training_examples\{.*\} (\S+)$", text, re.M) == ["NaN"]
    assert re.findall(r"^medfed_global_validation_metric\{.*\} (\S+)$", text, re.M) == [
        str(0.1 * 3)
    ]
    assert "pid=" not in text


def _defined_metrics() -> set[str]:
    from prometheus_client import REGISTRY

    import medfed.client.node_metrics
    import medfed.server.run.coordinator_metrics  # noqa: F401

    names = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return {n for n in names if n.startswith("medfed_")}


def test_alert_rules_dashboard_and_scrape_config_are_valid():
    rules = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr

    defined = _defined_metrics()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/medfed.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        names = {n for t in panel["targets"] for n in re.findall(r"medfed_[a-z_]+", t["expr"])}
        assert names, panel["title"]
        assert names <= defined, (panel["title"], names - defined)
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        assert set(re.findall(r"medfed_[a-z_]+", rule["expr"])) <= defined, rule["alert"]

    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    for service in ("prometheus", "grafana"):
        for volume in compose["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
