"""`medfed simulate --ray-address` on a real two-node Ray cluster on this machine.

The cluster is what an operator would have started: a head and a second node
(`ray start --address ...`), one CPU each, each with its own temp dir, ports,
cache and hospital audit log in its environment, which the Ray workers it
starts inherit. A hospital's audit line therefore says on which node its
work ran. The cluster is stopped here by pid (its processes carry this
test's tag), never with `ray stop`, which ends every Ray instance on the
machine, other runs' included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medfed.shared_models import processes
from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.supervision import free_port
from tests.audit_log import read_audit
from tests.conftest import SHOWN

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))
NODES = ("head", "worker")
DAEMONS = ("gcs_server", "raylet")  # a node's own processes (by /proc comm)
# Ports a node would otherwise take at fixed defaults, colliding with the other node or
# with any other Ray on this machine.
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port")  # fmt: skip
HEAD_PORTS = ("--dashboard-port", "--ray-client-server-port")
TINY_RUN = ["--sites", "2", "--rounds", "2", "--images-per-site", "16", "-c", "image-size=32",
            "-c", "model-width=4", "-c", "model-depth=2", "-c", "batch-size=4",
            "-c", "federated-stats=false", *SHOWN]  # fmt: skip

# What the cluster says about itself, asked by a driver of its own.
CLUSTER_STATE = """
import json, ray
ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
print(json.dumps({"nodes": nodes, "free-cpus": ray.available_resources().get("CPU", 0)}))
ray.shutdown()
"""


@dataclass
class Cluster:
    address: str
    tag: str  # carried by every process of the cluster (and by nothing medfed starts)
    folder: Path
    nodes: dict[str, bool] = field(default_factory=dict)  # Ray's node ids: alive
    started: dict[int, int] = field(default_factory=dict)  # its daemons when it started

    def forget_audit(self) -> None:
        for node in NODES:
            (self.folder / node / "audit.jsonl").unlink(missing_ok=True)

    def trained(self, node: str) -> set[tuple[str, int]]:
        """(site, round) of every training the node's Ray workers audited."""
        log = self.folder / node / "audit.jsonl"
        events = read_audit(log) if log.exists() else []
        return {(e["site"], e["round"]) for e in events if e["event"] == "round-trained"}

    def state(self) -> dict:
        env = {**os.environ, "RAY_ADDRESS": self.address}
        run = subprocess.run(
            [sys.executable, "-c", CLUSTER_STATE], env=env, capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip
        return json.loads(run.stdout.strip().splitlines()[-1])

    def daemons(self) -> dict[int, int]:
        """The GCS and the raylets, by pid with their start time."""
        found = processes.started_by(self.tag)
        return {pid: start for pid, start in found.items() if _name(pid) in DAEMONS}


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ray_start(cluster: Path, node: str, tag: str, *args: str) -> None:
    folder = cluster / node
    env = {
        **os.environ,
        processes.TAG_ENV: tag,
        AUDIT_ENV: str(folder / "audit.jsonl"),
        "MEDFED_CACHE": str(folder / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    ports = [x for flag in NODE_PORTS for x in (flag, str(free_port()))]
    command = [
        RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
        "--resources", json.dumps({node: 1}), "--object-store-memory", str(100 * 2**20),
        "--temp-dir", str(folder / "ray"), "--disable-usage-stats", *ports, *args,
    ]  # fmt: skip
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short: Ray's unix sockets live under the temp dir, and a socket path is at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="mf-ray-"))
    tag = f"test-ray-cluster-{os.getpid()}-{time.monotonic_ns()}"
    port = free_port()
    try:
        head_ports = [x for flag in HEAD_PORTS for x in (flag, str(free_port()))]
        _ray_start(folder, "head", tag, "--head", "--port", str(port),
                   "--include-dashboard", "false", *head_ports)  # fmt: skip
        _ray_start(folder, "worker", tag, "--address", f"127.0.0.1:{port}")
        ready = Cluster(f"127.0.0.1:{port}", tag, folder)
        deadline = time.monotonic() + 60
        while sum((state := ready.state())["nodes"].values()) < len(NODES):
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(1)
        assert state["free-cpus"] == len(NODES)
        ready.nodes, ready.started = state["nodes"], ready.daemons()
        assert len(ready.started) == 3, "a GCS and two raylets"
        yield ready
    finally:
        processes.stop_started(tag, grace=3.0)
        shutil.rmtree(folder, ignore_errors=True)


def _simulate(cluster: Cluster, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "medfed.server.cli", "simulate",
            "--ray-address", cluster.address, "--out", str(out), *TINY_RUN, *args]  # fmt: skip


def _assert_intact(cluster: Cluster, out: Path) -> None:
    """The cluster is as it was: the same GCS and raylets, both nodes alive, the run's
    actors gone (their CPUs free again); nothing of the run's is left running."""
    assert cluster.daemons() == cluster.started
    deadline = time.monotonic() + 30
    while (after := cluster.state())["free-cpus"] < len(NODES) and time.monotonic() < deadline:
        time.sleep(1)
    assert after["nodes"] == cluster.nodes and all(after["nodes"].values())
    assert after["free-cpus"] == len(NODES)
    found = subprocess.run(["pgrep", "-f", str(out / "run-config.toml")], capture_output=True)
    assert found.stdout.strip() == b""


@pytest.mark.slow
def test_hospitals_run_on_both_nodes_of_a_cluster_that_outlives_the_run(tmp_path, cluster):
    cluster.forget_audit()
    out = tmp_path / "run"
    result = subprocess.run(_simulate(cluster, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Ray cluster at {cluster.address}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all(r["replied"] == ["site-0", "site-1"] for r in metrics["rounds"])

    # Each node's Ray workers wrote to that node's audit log: the training ran on both.
    head, worker = cluster.trained("head"), cluster.trained("worker")
    assert head and worker, (head, worker)
    assert head | worker == {(site, r) for site in ("site-0", "site-1") for r in (1, 2)}
    assert not head & worker, "each training ran once"
    _assert_intact(cluster, out)
    recorded = tomllib.loads((out / "federation.toml").read_text())
    assert recorded["ray-address"] == cluster.address, "--resume joins the same cluster"


def test_a_stopped_run_is_interrupted_and_the_cluster_stays(tmp_path, cluster):
    out = tmp_path / "run"
    log = (tmp_path / "simulate.log").open("w")
    run = subprocess.Popen(_simulate(cluster, out), stdout=log, stderr=log)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "round-000.pt").exists():  # the hospitals are at work
        assert run.poll() is None and time.monotonic() < deadline, "round 0 never finished"
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", metrics.get("error")
    _assert_intact(cluster, out)
