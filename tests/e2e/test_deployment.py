"""A real deployment on 127.0.0.1: CA and keys, a TLS coordinator with node
authentication, authenticated hospital nodes, `flwr run`, audit logs.

Every process is started here and stopped by pid; ports are chosen free
(tests/deployment.py starts them).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w

from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.supervision import executable, free_port
from tests import deployment
from tests.audit_log import read_audit
from tests.deployment import (
    REPO,
    admit,
    flwr,
    medfed,
    online,
    package_sha256,
    run,
    spawn,
    start_node,
    stop_all,
    tree,
    wait,
)

pytestmark = pytest.mark.e2e
SITES = ["site-0", "site-1", "site-2"]


@pytest.fixture
def consortium(tmp_path, seg_sites):
    """A coordinator behind its proxy, an operator connected with a certificate, hospitals'
    own keys, and an outsider holding only the CA certificate."""
    with deployment.consortium(tmp_path, seg_sites, [*SITES, "rogue"]) as c:
        yield c


def _outsider_is_refused(c) -> None:
    """Holding only ca.pem: no node registration, no run, no Runtime API."""
    rogue_key = c["tmp"] / "keys" / "rogue" / "rogue.pub"
    for args in (["supernode", "register", str(rogue_key), "consortium"],
                 ["run", str(REPO), "consortium"]):  # fmt: skip
        tried = subprocess.run([executable("flwr"), *args], capture_output=True, text=True,
                               env=c["outsider"], timeout=60)  # fmt: skip
        assert tried.returncode != 0, tried.stdout
        assert (
            "403" in tried.stdout + tried.stderr or "operators only" in tried.stdout + tried.stderr
        )
    runtime = httpx.post(
        f"https://127.0.0.1:{c['port']}/v1/runtime/flwr.proto.Runtime/GetRun",
        verify=ssl.create_default_context(cafile=str(c["certs"] / "ca.pem")),
    )
    assert runtime.status_code == 404, "the Runtime API never leaves the coordinator"


def _unapproved_code_never_runs(c, tiny: str) -> None:
    """An app package no hospital approved: refused before a line of it runs, audited with
    its hash at every site, and the coordinator's run fails naming the refusal."""
    evil = c["tmp"] / "evil-app"
    marker = c["tmp"] / "evil-ran"
    (evil / "evil_client.py").parent.mkdir(parents=True)
    (evil / "evil_client.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    # medfed's own app with one line changed: the ClientApp is the attacker's
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    flwr_app["components"]["clientapp"] = "evil_client:app"
    del flwr_app["fab-include"]  # the package carries the attacker's module
    (evil / "pyproject.toml").write_text(tomli_w.dumps({
        "project": {"name": "evil", "version": "1.0.0", "description": "", "license": "MIT"},
        "tool": {"flwr": {"app": {**flwr_app, "publisher": "evil"}}},
    }))  # fmt: skip
    digest = package_sha256(evil, c["tmp"] / "evil-build")
    run_id = run(c, f"num-server-rounds=1 min-nodes=3 {tiny}", app=evil)
    metrics = json.loads((c["tmp"] / "coordinator" / "runs" / run_id / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "is not approved at site-" in metrics["error"]
    assert not marker.exists(), "the unapproved ClientApp never ran"
    for site in SITES:
        refused = [e for e in read_audit(c["tmp"] / site / "audit.jsonl")
                   if e["event"] == "app-refused"]  # fmt: skip
        assert refused and {e["app_sha256"] for e in refused} == {digest}, site
        assert (c["tmp"] / site / "refused-apps" / f"{digest}.fab").is_file()


def test_authenticated_federation_end_to_end(consortium):
    c = consortium
    c["app_sha256"] = package_sha256(REPO, c["tmp"] / "build")
    _outsider_is_refused(c)
    registered = {}
    for name in SITES:  # the operator admits the three hospitals, not the rogue
        registered[name] = admit(c, name)
    c["nodes"] = {name: start_node(c, name, c["sites"] / name) for name in SITES}
    rogue = start_node(c, "rogue", c["sites"] / "site-0")
    wait(lambda: len(online(c)) == 3, 120, "three hospitals online")

    tiny = "image-size=32 model-width=4 model-depth=2 node-wait-seconds=30.0"
    # secure aggregation through real SuperNodes: protocol state lives in each node's context
    run_id = run(c, f"num-server-rounds=2 min-nodes=3 secure-aggregation=true {tiny}")
    listed = flwr(c["env"], "ls", "consortium", "--run-id", run_id)["runs"][0]
    assert listed["status"] == "finished:completed"
    assert set(online(c)) == set(registered.values()), "the unregistered key stays out"
    assert rogue.poll() is None or rogue.returncode != 0
    _refuses_plain_and_foreign_connections(c, set(registered.values()))

    pulled = c["tmp"] / "pulled"
    assert (
        medfed(
            "coordinator",
            "pull",
            run_id,
            "--state",
            str(c["tmp"] / "coordinator"),
            "--to",
            str(pulled),
        ).returncode
        == 0
    )
    cfg, net = load_global_model(pulled)
    assert cfg.num_server_rounds == 2 and sum(p.numel() for p in net.parameters()) > 0
    metrics = json.loads((pulled / "metrics.json").read_text())
    assert all(r["replied"] == SITES for r in metrics["rounds"])
    assert all(r["secure-aggregation"]["survivors"] == 3 for r in metrics["rounds"][1:])

    _unapproved_code_never_runs(c, tiny.replace("30.0", "4.0") + " federated-stats=false")

    coordinator_log = read_audit(c["tmp"] / "coordinator" / "audit.jsonl")
    events = [e["event"] for e in coordinator_log]
    assert events[0] == "coordinator-started" and events.count("run-started") == 2
    admissions = {
        e["hospital"]: e["node_id"] for e in coordinator_log if e["event"] == "node-admitted"
    }
    assert admissions == registered
    started = next(e for e in coordinator_log if e["event"] == "run-started")
    assert started["app_hash"] == listed["fab-hash"] and started["config"]["min-nodes"] == 3
    rounds = [e for e in coordinator_log if e["event"] == "round" and e["run"] == int(run_id)]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["replied"] == SITES and len(r["model_sha256"]) == 64 for r in rounds)
    finished = [e for e in coordinator_log if e["event"] == "run-finished"]
    assert [f["status"] for f in finished] == ["completed", "failed"]

    site_log = read_audit(c["tmp"] / "site-1" / "audit.jsonl")
    trained = [e for e in site_log if e["event"] == "round-trained"]
    assert [t["round"] for t in trained] == [1, 2]
    # under secure aggregation the site sent one masked vector, never its weights
    assert list(trained[0]["sent_arrays"]) == ["masked"] and trained[0]["masked"] is True
    assert "train-loss" in trained[0]["sent_metrics"]
    for path in [
        c["tmp"] / "coordinator" / "audit.jsonl",
        *(c["tmp"] / s / "audit.jsonl" for s in SITES),
    ]:
        text = path.read_text()
        assert "imagesTr" not in text and ".nii" not in text, f"{path} names image files"

    _a_killed_warm_worker_is_restarted_and_its_hospital_still_trains(c, tiny)
    _a_lost_hospital_is_named_once_and_rejoins(c, tiny)
    failed_run = _a_killed_serverapp_is_recorded_failed_and_can_be_pulled(c, tiny)
    _resumed_then_stopped(c, tiny, failed_run)


def _run_folder(c, run_id) -> Path:
    return c["tmp"] / "coordinator" / "runs" / str(run_id)


def _metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"rounds": [], "status": "starting"}


def _start_run(c, config: str) -> tuple[str, Path]:
    run_id = flwr(c["env"], "run", str(REPO), "consortium", "--run-config", config)["run-id"]
    return run_id, _run_folder(c, run_id)


def _workers(c, site: str) -> list[int]:
    """The pids of a hospital node's warm worker (client/warm_worker.py)."""
    return [
        pid
        for pid in tree(c["nodes"][site].pid)
        if b"medfed.client.warm_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _a_killed_warm_worker_is_restarted_and_its_hospital_still_trains(c, tiny: str) -> None:
    """SIGKILL of site-0's warm worker between runs: the node restarts it and audits it,
    and the next run's rounds count site-0 (a message the worker cannot take runs in a
    fresh process meanwhile). The run is started as the runbook starts one, with
    `medfed operator run`: its exit code says the run completed."""
    (worker,) = _workers(c, "site-0")
    os.kill(worker, signal.SIGKILL)
    config = f"num-server-rounds=2 min-nodes=3 federated-stats=false {tiny}"
    started = medfed("operator", "run", str(REPO), "--run-config", config, env=c["env"],
                     timeout=300)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = started.stdout.split("run ", 1)[1].split()[0]
    assert f"run {run_id}: finished:completed" in started.stdout
    metrics = _metrics(_run_folder(c, run_id))
    assert metrics["status"] == "completed", metrics.get("error")
    assert all(r["replied"] == SITES for r in metrics["rounds"])
    restarted = [e for e in read_audit(c["tmp"] / "site-0" / "audit.jsonl")
                 if e["event"] == "worker-restarted"]  # fmt: skip
    assert len(restarted) == 1 and restarted[0]["exit_code"] == -signal.SIGKILL
    (again,) = _workers(c, "site-0")
    assert again != worker


def _a_lost_hospital_is_named_once_and_rejoins(c, tiny: str) -> None:
    """SIGKILL of a whole hospital node in round 2: the round finishes with the others and
    names the lost hospital once, by site, as unavailable; restarted, it trains again."""
    # twelve rounds: the node's restart takes a dozen seconds, and a round of this run
    # about four, so six rounds had ended before the restarted node was back
    _, folder = _start_run(c, f"num-server-rounds=12 min-nodes=2 federated-stats=false {tiny}")
    wait(lambda: len(_metrics(folder)["rounds"]) >= 2, 120, "round 1")  # round 2 is sent
    node = c["nodes"]["site-2"]
    for pid in tree(node.pid):  # the hospital's machine goes down
        os.kill(pid, signal.SIGKILL)
    node.wait()
    progress = folder / "progress.log"
    wait(lambda: "site-2: node unavailable" in progress.read_text(), 150, "the loss noticed")
    c["nodes"]["site-2"] = start_node(c, "site-2", c["sites"] / "site-2")
    wait(lambda: _metrics(folder)["status"] != "running", 300, "the run")
    metrics = _metrics(folder)
    assert metrics["status"] == "completed", metrics.get("error")
    lost = metrics["rounds"][2]
    assert list(lost["failures"]) == ["site-2"], lost["failures"]
    assert lost["failures"]["site-2"].startswith("node unavailable: its heartbeats stopped")
    assert lost["replied"] == ["site-0", "site-1"]
    assert "node-1" not in json.dumps(metrics), "never the SuperLink's own id"
    assert "round 2/12 | sites 2/3" in progress.read_text()
    rejoined = [r["round"] for r in metrics["rounds"][3:] if "site-2" in r["replied"]]
    assert rejoined, "the restarted hospital trains again in a later round"


def _a_killed_serverapp_is_recorded_failed_and_can_be_pulled(c, tiny: str) -> str:
    """SIGKILL of a run's ServerApp process: the coordinator closes the record (failed, with
    the reason, audited, reported) and the folder, checkpoints included, can be pulled.
    Returns the run id."""
    run_id, folder = _start_run(c, f"num-server-rounds=20 min-nodes=2 federated-stats=false {tiny}")
    wait(lambda: len(_metrics(folder)["rounds"]) >= 1, 120, "round 0")
    os.kill(_metrics(folder)["process"]["pid"], signal.SIGKILL)
    wait(lambda: _metrics(folder)["status"] != "running", 30, "the coordinator to notice")
    metrics = _metrics(folder)
    assert metrics["status"] == "failed" and "ServerApp process ended" in metrics["error"]
    report = folder / "report.md"  # written just after metrics.json
    wait(lambda: report.is_file() and "Status: **failed**" in report.read_text(), 30, "report")
    finished = [e for e in read_audit(c["tmp"] / "coordinator" / "audit.jsonl")
                if e["event"] == "run-finished" and e["run"] == int(run_id)]  # fmt: skip
    assert [e["status"] for e in finished] == ["failed"]
    pulled = c["tmp"] / "pulled-failed"
    copied = medfed("coordinator", "pull", str(run_id), "--state",
                     str(c["tmp"] / "coordinator"), "--to", str(pulled))  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert (pulled / "checkpoints" / "round-000.pt").is_file()
    return run_id


def _resumed_then_stopped(c, tiny: str, failed_run: str) -> None:
    """The failed run carried on by run id; then SIGTERM to `medfed coordinator start` and
    `medfed node start` mid-run: within 15 s nothing they started is left (SuperExec and
    app processes in sessions of their own included), and the run says interrupted."""
    config = f"num-server-rounds=20 min-nodes=2 federated-stats=false {tiny}"
    _, folder = _start_run(c, f"{config} resume-from='{failed_run}'")
    wait(lambda: len(_metrics(folder)["rounds"]) >= 2, 120, "the first resumed round")
    coordinator, nodes = c["processes"][0], list(c["nodes"].values())
    started = set().union(*(tree(p.pid) for p in [coordinator, *nodes]))
    assert len(started) > 2 * (1 + len(nodes)), "each command started Flower processes"
    asked = time.monotonic()
    for process in [coordinator, *nodes]:
        os.kill(process.pid, signal.SIGTERM)
    while time.monotonic() - asked < 15 and started & tree(1):
        time.sleep(0.2)
    assert not started & tree(1), f"left {time.monotonic() - asked:.0f}s after SIGTERM"
    assert all(p.wait(timeout=5) == 0 for p in [coordinator, *nodes]), "a clean stop"
    metrics = _metrics(folder)
    assert metrics["status"] == "interrupted" and "coordinator was stopped" in metrics["error"]
    assert metrics["resumed"][0]["after-round"] == 0 and metrics["rounds"][0]["round"] == 0
    assert [r["round"] for r in metrics["rounds"]] == list(range(len(metrics["rounds"])))
    events = [e["event"] for e in read_audit(c["tmp"] / "coordinator" / "audit.jsonl")]
    assert events[-1] == "coordinator-stopped"


def _refuses_plain_and_foreign_connections(c, admitted: set[str]) -> None:
    """A node without TLS, or trusting another CA, never gets in (even with a valid key)."""
    other = c["tmp"] / "other-ca"
    assert medfed("certs", "init", "--out", str(other), "--host", "127.0.0.1").returncode == 0
    key = c["tmp"] / "keys" / "site-0" / "site-0.key"
    base = [
        executable("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{c['port']}",
        "--node-config",
        f'data-path="{c["sites"] / "site-0"}"',
        "--max-retries",
        "2",
        "--max-wait-time",
        "15",
    ]
    attempts = {
        "no TLS": [*base, "--insecure", "--port", str(free_port())],
        "another CA": [
            *base,
            "--root-certificates",
            str(other / "ca.pem"),
            "--auth-supernode-private-key",
            str(key),
            "--port",
            str(free_port()),
        ],
    }
    tried = {
        what: spawn(command, c["tmp"] / f"{what}.log", c["env"])
        for what, command in attempts.items()
    }

    def refused(what: str) -> bool:
        log = (c["tmp"] / f"{what}.log").read_text()
        return "Connection attempt failed" in log or "Exit Code" in log

    try:
        for what in tried:  # each node's connection attempts are refused
            wait(lambda what=what: refused(what), 60, f"{what}: a refused connection")
        assert set(online(c)) == admitted, "no further node got in"
        for what, process in tried.items():
            assert process.poll() in (None, *range(1, 256)), what  # retrying, or gave up
    finally:
        stop_all(list(tried.values()))
