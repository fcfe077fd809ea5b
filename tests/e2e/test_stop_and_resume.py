"""Stopping that stops, and runs that resume: real `medfed simulate` processes, signalled
and killed by pid.

A stop is checked against every process the command had started by then,
found by walking /proc from its pid (Flower's SuperExec and flwr-simulation run
in sessions of their own, Ray's workers below a raylet): by pid and by session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SHOWN

pytestmark = pytest.mark.e2e

# A small federation: the processes, not the training, are under test.
RUN = ["--task", "classification", "--sites", "2", "--images-per-site", "16", "--seed", "3",
       "-c", "image-size=32", "-c", "model-width=4", "-c", "model-depth=2", "-c", "batch-size=4",
       "-c", "federated-stats=false", *SHOWN]  # fmt: skip


def _simulate(out: Path, *args: str) -> subprocess.Popen:
    """`medfed simulate` of the small federation into `out` (`args` add to RUN), or with
    `args` = ("--resume",) the run in `out` carried on."""
    log = (out.parent / f"{out.name}-{len(list(out.parent.glob('*.log')))}.log").open("w")
    where = ["--resume", str(out)] if args == ("--resume",) else ["--out", str(out), *RUN, *args]
    command = [sys.executable, "-m", "medfed.server.cli", "simulate", *where]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _wait_for_round(out: Path, server_round: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, f"medfed simulate ended early ({process.returncode})"
        try:
            if any(r["round"] >= server_round for r in _metrics(out)["rounds"]):
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"round {server_round} never finished")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _live() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            found[int(entry.name)] = fields
    return found


def _tree(root: int) -> tuple[set[int], set[int]]:
    """Every live descendant of `root` (with it) and the sessions they run in."""
    live = _live()
    tree = {root}
    while True:
        below = {pid for pid, f in live.items() if int(f[1]) in tree} - tree
        if not below:
            break
        tree |= below
    return tree & set(live), {int(live[pid][3]) for pid in tree if pid in live}


def _stop_after_round(out: Path, server_round: int, signum: int, *args: str) -> None:
    process = _simulate(out, *args)
    try:
        _wait_for_round(out, server_round, process)
        started, sessions = _tree(process.pid)
        assert len(sessions) >= 3, "Flower's SuperLink, SuperExec and simulation each have one"
        asked = time.monotonic()
        os.kill(process.pid, signum)
        code = process.wait(timeout=15)
        while time.monotonic() - asked < 15 and (set(_live()) & started):
            time.sleep(0.2)
        left = set(_live()) & started
        in_sessions = {pid for pid, f in _live().items() if int(f[3]) in sessions}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 128 + signum
    assert not left, f"still running {time.monotonic() - asked:.0f}s after the stop: {left}"
    assert not in_sessions, f"processes left in the run's sessions: {in_sessions}"
    stopped = _metrics(out)
    assert stopped["status"] == "interrupted"
    assert signal.Signals(signum).name in stopped["error"]
    time.sleep(3)
    assert _metrics(out) == stopped, "nothing running in the background rewrites the record"


def test_sigint_then_sigterm_stop_every_process_and_the_run_says_interrupted(tmp_path):
    out = tmp_path / "run"
    _stop_after_round(out, 2, signal.SIGINT, "--rounds", "40")
    interrupted_at = _metrics(out)["rounds"][-1]["round"]
    # the interrupted run carries on where it stopped, and a supervisor's SIGTERM stops it too
    _stop_after_round(out, interrupted_at + 2, signal.SIGTERM, "--resume")
    rounds = [r["round"] for r in _metrics(out)["rounds"]]
    assert rounds == list(range(rounds[-1] + 1)) and rounds[-1] > interrupted_at


def test_a_killed_serverapp_is_recorded_failed_and_the_resumed_run_ends_like_an_unbroken_one(
    tmp_path,
):
    settings = ["--rounds", "4", "--strategy", "fedadam"]
    whole = tmp_path / "whole"
    assert _simulate(whole, *settings).wait(timeout=300) == 0
    expected = torch.load(whole / "global_model.pt", weights_only=True)

    out = tmp_path / "broken"
    process = _simulate(out, *settings)
    _wait_for_round(out, 2, process)
    os.kill(_metrics(out)["process"]["pid"], signal.SIGKILL)  # the ServerApp's own process
    # within seconds: medfed notices the dead ServerApp (Flower itself takes about a minute)
    assert process.wait(timeout=30) == 1, "a run whose ServerApp died is no success"
    killed = _metrics(out)
    assert killed["status"] == "failed" and "ServerApp process ended" in killed["error"]
    assert not (out / "global_model.pt").exists()

    assert _simulate(out, "--resume").wait(timeout=300) == 0
    resumed = _metrics(out)
    assert resumed["status"] == "completed"
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3, 4]
    assert resumed["resumed"][0]["after-round"] == killed["rounds"][-1]["round"] >= 2
    final = torch.load(out / "global_model.pt", weights_only=True)
    for name, tensor in expected.items():
        assert torch.allclose(final[name].float(), tensor.float(), atol=1e-6, rtol=0), name


def _raylet_below(root: int) -> int | None:
    """The pid of the Ray raylet among `root`'s descendants, if it has started."""
    for pid in sorted(_tree(root)[0]):
        try:
            if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_raylet_lost_before_the_first_round_is_retried_once_and_the_run_completes(tmp_path):
    """Issue 25: a newcomer's run died at start when Ray's raylet missed its heartbeats on
    a loaded machine, and was told to resume a run that had no round to resume from. Here
    the raylet is killed once the run has started, before any round completed."""
    out = tmp_path / "run"
    process = _simulate(out, "--rounds", "2")
    try:
        deadline, raylet = time.monotonic() + 180, None
        while raylet is None and time.monotonic() < deadline:
            raylet = _raylet_below(process.pid) if (out / "metrics.json").exists() else None
            time.sleep(0.05)
        assert raylet is not None, "no raylet below medfed simulate"
        assert not _metrics(out)["rounds"], "killed before the first round completed"
        os.kill(raylet, signal.SIGKILL)
        code = process.wait(timeout=480)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    said = next(out.parent.glob(f"{out.name}-*.log")).read_text()
    assert code == 0, said[-2000:]
    assert "Ray failed while the federation started" in said and "starting it once more" in said
    assert _metrics(out)["status"] == "completed"
    assert [r["round"] for r in _metrics(out)["rounds"]] == [0, 1, 2]
    first = json.loads((out / "logs" / "attempt-1-metrics.json").read_text())
    assert first["status"] == "failed" and not first["rounds"], "the failed attempt is kept"
