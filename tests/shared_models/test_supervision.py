"""Flower services both roles run: the supervisor stops its service on SIGTERM, restarts a
restartable one, and no Flower process inherits Flower's internal API switches."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from medfed.shared_models.supervision import flower_env

SUPERVISE = """
import sys
from medfed.shared_models.supervision import Service, supervise
child = [sys.executable, "-c", "import sys, time, pathlib;"
         " pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(600)", sys.argv[1]]
sys.exit(supervise([Service(child, env={"PATH": "/usr/bin:/bin"})]))
"""


def test_sigterm_stops_the_service_and_exits_cleanly(tmp_path):
    marker = tmp_path / "child-up"
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(marker)])
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the supervised child never started"
    children = subprocess.run(
        ["pgrep", "-f", str(marker)], capture_output=True, text=True
    ).stdout.split()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 0  # a requested stop is a clean exit
    time.sleep(0.5)
    assert children
    for pid in children:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", "child still running"


RESTARTING = """
import sys
from pathlib import Path
from medfed.shared_models.supervision import Service, supervise
log = Path(sys.argv[1])
helper = [sys.executable, "-c", "import sys, pathlib; p = pathlib.Path(sys.argv[1]);"
          " p.write_text(p.read_text() + 'ran ') if p.exists() else p.write_text('ran ');"
          " sys.exit(3)", str(log)]
main = [sys.executable, "-c", "import time; time.sleep(600)"]
noted = lambda code: log.write_text(log.read_text() + f"ended {code} ")
sys.exit(supervise([Service(helper, env={"PATH": "/usr/bin:/bin"}, restart=noted),
                    Service(main, env={"PATH": "/usr/bin:/bin"})]))
"""


def test_a_restartable_service_that_ends_is_noted_and_started_again(tmp_path):
    """The node's warm worker: its end stops nothing else; it runs again after each end."""
    log = tmp_path / "helper.log"
    supervisor = subprocess.Popen([sys.executable, "-c", RESTARTING, str(log)])
    deadline = time.monotonic() + 30
    while (not log.exists() or log.read_text().count("ran") < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert supervisor.poll() is None, "a restartable service's end stopped the others"
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 0
    assert log.read_text().startswith("ran ended 3 ran ended 3 ran")


def test_flower_processes_never_inherit_flowers_internal_api_switches(monkeypatch):
    """FLWR_INTERNAL_GRPC_CONTROL_API=1 would open Flower's legacy Control API on every
    interface, past the proxy: no Flower process of medfed's sees it."""
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    env = flower_env()
    assert not [k for k in env if k.startswith("FLWR_INTERNAL_")]
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
