"""The coordinator/node supervisor stops its Flower service cleanly on SIGTERM."""

import signal
import subprocess
import sys
import time
from pathlib import Path

SUPERVISE = """
import sys
from medfed.server.coordinator import supervise
child = [sys.executable, "-c", "import sys, time, pathlib;"
         " pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(600)", sys.argv[1]]
sys.exit(supervise(child, env={"PATH": "/usr/bin:/bin"}))
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
