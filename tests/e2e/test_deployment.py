"""A real deployment on 127.0.0.1: CA and keys, a TLS coordinator with node
authentication, authenticated hospital nodes, `flwr run`, audit logs.

Every process is started here and stopped by pid; ports are chosen free.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w

from medfed.shared_models.audit import read_audit
from medfed.shared_models.run_folder import load_global_model
from medfed.shared_models.runtime import executable, flower_env, free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SITES = ["site-0", "site-1", "site-2"]


def _medfed(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", *args], capture_output=True, text=True, **kwargs
    )


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process group at once, then wait (each one shuts down gracefully)."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _flwr(env: dict[str, str], *args: str) -> dict:
    result = subprocess.run(
        [executable("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout[result.stdout.index("{") :])


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _flwr_home(home: Path, address: str, **connection) -> dict[str, str]:
    """An environment for `flwr` whose default connection is `consortium` at `address`."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {"default": "consortium", "consortium": {"address": address, **connection}}
    }
    (home / "config.toml").write_text(tomli_w.dumps(config))
    return flower_env(home)  # also puts Flower's own scripts on PATH


def _answers(url: str, ca: Path) -> bool:
    try:
        return httpx.get(
            url, verify=ssl.create_default_context(cafile=str(ca)), timeout=1
        ).is_success
    except httpx.HTTPError:
        return False


@pytest.fixture
def consortium(tmp_path, seg_sites):
    """A coordinator behind its proxy, an operator connected with a certificate, hospitals'
    own keys, and an outsider holding only the CA certificate."""
    certs = tmp_path / "certs"
    assert _medfed("certs", "init", "--out", str(certs), "--host", "127.0.0.1").returncode == 0
    assert _medfed("certs", "add-operator", "ops", "--out", str(certs)).returncode == 0
    for name in [*SITES, "rogue"]:  # each hospital makes its own key pair, at the hospital
        made = _medfed("node", "keygen", name, "--out", str(tmp_path / "keys" / name))
        assert made.returncode == 0, made.stderr
    port, local = free_port(), free_port()
    env = flower_env(tmp_path / "operator")
    outsider = _flwr_home(
        tmp_path / "outsider", f"127.0.0.1:{port}", **{"root-certificates": str(certs / "ca.pem")}
    )
    operator = certs / "operators" / "ops"
    processes = [
        _spawn(
            [sys.executable, "-m", "medfed.server.cli", "coordinator", "start",
             "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port),
             "--state", str(tmp_path / "coordinator")],
            tmp_path / "coordinator.log", env,
        ),
        _spawn(
            [sys.executable, "-m", "medfed.server.cli", "operator", "connect",
             "--coordinator", f"127.0.0.1:{port}", "--cert", str(operator / "ops.pem"),
             "--key", str(operator / "ops.key"), "--ca", str(operator / "ca.pem"),
             "--port", str(local), "--state", str(tmp_path / "operator-state")],
            tmp_path / "operator.log", env,
        ),
    ]  # fmt: skip
    try:
        _wait(lambda: _answers(f"https://127.0.0.1:{port}/health", certs / "ca.pem"), 60, "proxy")
        _wait(lambda: (tmp_path / "operator" / "config.toml").is_file(), 30, "operator link")
        yield {
            "certs": certs,
            "port": port,
            "env": env,
            "outsider": outsider,
            "tmp": tmp_path,
            "sites": seg_sites,
            "processes": processes,
        }
    finally:
        _stop_all(processes)


def _start_node(c, name: str, data: Path) -> subprocess.Popen:
    """A hospital's node; it runs only the app package its staff approved."""
    keys = c["tmp"] / "keys" / name
    approved = _medfed("node", "approve", c["app_sha256"], "--state", str(c["tmp"] / name))
    assert approved.returncode == 0, approved.stderr
    node = _spawn(
        [
            sys.executable,
            "-m",
            "medfed.server.cli",
            "node",
            "start",
            "--coordinator",
            f"127.0.0.1:{c['port']}",
            "--ca",
            str(c["certs"] / "ca.pem"),
            "--key",
            str(keys / f"{name}.key"),
            "--data",
            str(data),
            "--runtime-port",
            str(free_port()),
            "--state",
            str(c["tmp"] / name),
        ],
        c["tmp"] / f"{name}.log",
        c["env"],
    )
    c["processes"].append(node)
    return node


def _online(c) -> list[str]:
    nodes = _flwr(c["env"], "supernode", "ls", "consortium")["nodes"]
    return [str(n["node-id"]) for n in nodes if n["status"] == "online"]


def _run(c, config: str, app: Path = REPO) -> str:
    started = _flwr(c["env"], "run", str(app), "consortium", "--run-config", config)
    assert "run-id" in started, started
    run_id = started["run-id"]

    def finished() -> bool:
        run = _flwr(c["env"], "ls", "consortium", "--run-id", run_id)["runs"][0]
        return run["status"].startswith("finished")

    _wait(finished, 400, f"run {run_id}")
    return run_id


def _package_sha256(app: Path, work: Path) -> str:
    """The SHA-256 of the app package `flwr run app` submits (what hospitals approve)."""
    work.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([executable("flwr"), "build", "--app", str(app)], cwd=work,
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    return hashlib.sha256(next(work.glob("*.fab")).read_bytes()).hexdigest()


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
    digest = _package_sha256(evil, c["tmp"] / "evil-build")
    run_id = _run(c, f"num-server-rounds=1 min-nodes=3 {tiny}", app=evil)
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
    c["app_sha256"] = _package_sha256(REPO, c["tmp"] / "build")
    _outsider_is_refused(c)
    registered = {}
    for name in SITES:  # the operator admits the three hospitals, not the rogue
        admitted = subprocess.run(
            [sys.executable, "-m", "medfed.server.cli", "coordinator", "admit", name,
             "--public-key", str(c["tmp"] / "keys" / name / f"{name}.pub"),
             "--state", str(c["tmp"] / "coordinator"),
             "--connection", "consortium"],
            capture_output=True, text=True, env=c["env"],
        )  # fmt: skip
        assert admitted.returncode == 0, admitted.stdout + admitted.stderr
        registered[name] = admitted.stdout.split()[-1]
    c["nodes"] = {name: _start_node(c, name, c["sites"] / name) for name in SITES}
    rogue = _start_node(c, "rogue", c["sites"] / "site-0")
    _wait(lambda: len(_online(c)) == 3, 120, "three hospitals online")

    tiny = "image-size=32 model-width=4 model-depth=2 node-wait-seconds=30.0"
    # secure aggregation through real SuperNodes: protocol state lives in each node's context
    run_id = _run(c, f"num-server-rounds=2 min-nodes=3 secure-aggregation=true {tiny}")
    run = _flwr(c["env"], "ls", "consortium", "--run-id", run_id)["runs"][0]
    assert run["status"] == "finished:completed"
    assert set(_online(c)) == set(registered.values()), "the unregistered key stays out"
    assert rogue.poll() is None or rogue.returncode != 0
    _refuses_plain_and_foreign_connections(c, set(registered.values()))

    pulled = c["tmp"] / "pulled"
    assert (
        _medfed(
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
    assert started["app_hash"] == run["fab-hash"] and started["config"]["min-nodes"] == 3
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

    _a_lost_hospital_is_named_once_and_rejoins(c, tiny)
    failed_run = _a_killed_serverapp_is_recorded_failed_and_can_be_pulled(c, tiny)
    _resumed_then_stopped(c, tiny, failed_run)


def _tree(root: int) -> set[int]:
    """`root` and every live descendant (Flower's detached services and app processes too)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    tree = {root}
    while below := {pid for pid, parent in parents.items() if parent in tree} - tree:
        tree |= below
    return tree & set(parents)


def _run_folder(c, run_id) -> Path:
    return c["tmp"] / "coordinator" / "runs" / str(run_id)


def _metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"rounds": [], "status": "starting"}


def _start_run(c, config: str) -> tuple[str, Path]:
    run_id = _flwr(c["env"], "run", str(REPO), "consortium", "--run-config", config)["run-id"]
    return run_id, _run_folder(c, run_id)


def _a_lost_hospital_is_named_once_and_rejoins(c, tiny: str) -> None:
    """SIGKILL of a whole hospital node in round 2: the round finishes with the others and
    names the lost hospital once, by site, as unavailable; restarted, it trains again."""
    _, folder = _start_run(c, f"num-server-rounds=4 min-nodes=2 federated-stats=false {tiny}")
    _wait(lambda: len(_metrics(folder)["rounds"]) >= 2, 120, "round 1")  # round 2 is sent
    node = c["nodes"]["site-2"]
    for pid in _tree(node.pid):  # the hospital's machine goes down
        os.kill(pid, signal.SIGKILL)
    node.wait()
    progress = folder / "progress.log"
    _wait(lambda: "site-2: node unavailable" in progress.read_text(), 150, "the loss noticed")
    c["nodes"]["site-2"] = _start_node(c, "site-2", c["sites"] / "site-2")
    _wait(lambda: _metrics(folder)["status"] != "running", 300, "the run")
    metrics = _metrics(folder)
    assert metrics["status"] == "completed", metrics.get("error")
    lost = metrics["rounds"][2]
    assert list(lost["failures"]) == ["site-2"], lost["failures"]
    assert lost["failures"]["site-2"].startswith("node unavailable: its heartbeats stopped")
    assert lost["replied"] == ["site-0", "site-1"]
    assert "node-1" not in json.dumps(metrics), "never the SuperLink's own id"
    assert "round 2/4 | sites 2/3" in progress.read_text()
    rejoined = [r["round"] for r in metrics["rounds"][3:] if "site-2" in r["replied"]]
    assert rejoined, "the restarted hospital trains again in a later round"


def _a_killed_serverapp_is_recorded_failed_and_can_be_pulled(c, tiny: str) -> str:
    """SIGKILL of a run's ServerApp process: the coordinator closes the record (failed, with
    the reason, audited, reported) and the folder, checkpoints included, can be pulled.
    Returns the run id."""
    run_id, folder = _start_run(c, f"num-server-rounds=20 min-nodes=2 federated-stats=false {tiny}")
    _wait(lambda: len(_metrics(folder)["rounds"]) >= 1, 120, "round 0")
    os.kill(_metrics(folder)["process"]["pid"], signal.SIGKILL)
    _wait(lambda: _metrics(folder)["status"] != "running", 30, "the coordinator to notice")
    metrics = _metrics(folder)
    assert metrics["status"] == "failed" and "ServerApp process ended" in metrics["error"]
    report = folder / "report.md"  # written just after metrics.json
    _wait(lambda: report.is_file() and "Status: **failed**" in report.read_text(), 30, "report")
    finished = [e for e in read_audit(c["tmp"] / "coordinator" / "audit.jsonl")
                if e["event"] == "run-finished" and e["run"] == int(run_id)]  # fmt: skip
    assert [e["status"] for e in finished] == ["failed"]
    pulled = c["tmp"] / "pulled-failed"
    copied = _medfed("coordinator", "pull", str(run_id), "--state",
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
    _wait(lambda: len(_metrics(folder)["rounds"]) >= 2, 120, "the first resumed round")
    coordinator, nodes = c["processes"][0], list(c["nodes"].values())
    started = set().union(*(_tree(p.pid) for p in [coordinator, *nodes]))
    assert len(started) > 2 * (1 + len(nodes)), "each command started Flower processes"
    asked = time.monotonic()
    for process in [coordinator, *nodes]:
        os.kill(process.pid, signal.SIGTERM)
    while time.monotonic() - asked < 15 and started & _tree(1):
        time.sleep(0.2)
    assert not started & _tree(1), f"left {time.monotonic() - asked:.0f}s after SIGTERM"
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
    assert _medfed("certs", "init", "--out", str(other), "--host", "127.0.0.1").returncode == 0
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
        what: _spawn(command, c["tmp"] / f"{what}.log", c["env"])
        for what, command in attempts.items()
    }
    try:
        time.sleep(15)  # several connection attempts, each refused
        assert set(_online(c)) == admitted, "no further node got in"
        for what, process in tried.items():
            assert process.poll() in (None, *range(1, 256)), what  # retrying, or gave up
            log = (c["tmp"] / f"{what}.log").read_text()
            assert "Connection attempt failed" in log or "Exit Code" in log, what
    finally:
        _stop_all(list(tried.values()))
