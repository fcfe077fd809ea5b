"""medfed's SuperNode and SuperExec processes: Flower's waits shortened while a run is
active, only on the verified Flower."""

from __future__ import annotations

import inspect
import types

import flwr
import pytest
from flwr.supercore.superexec import run_superexec
from flwr.supernode import start_client_internal as loop

from medfed.client import supernode_runner as runner
from medfed.client.node import TASK_POLL_ENV
from medfed.shared_models.flower_pin import VERIFIED_FLOWER, UnverifiedFlower


def test_the_installed_flower_is_the_verified_one():
    """Breaks when Flower's loops change: re-verify their waits, then the digests."""
    runner.check_flower(loop, flwr.__version__, runner.SUPERNODE_SOURCES)
    runner.check_flower(run_superexec, flwr.__version__, runner.SUPEREXEC_SOURCES)
    runner.check_flower(loop, flwr.__version__, runner.SUPERNODE_PULLERS)
    assert "time.sleep(3)" in inspect.getsource(loop.start_client_internal)
    assert inspect.getsource(loop._push_messages).count("time.sleep(0.5)") == 2
    source = inspect.getsource(run_superexec.run_superexec)
    assert "time.sleep(task_poll_interval)" in source and "_handle_launch_result(" in source


def test_another_flower_version_is_refused():
    with pytest.raises(UnverifiedFlower, match=r"flwr 1\.43\.0 is installed"):
        runner.check_flower(loop, "1.43.0", runner.SUPERNODE_SOURCES)


def test_a_changed_loop_is_refused():
    changed = types.ModuleType("changed")
    changed.start_client_internal = lambda: None
    changed._push_messages = loop._push_messages
    with pytest.raises(UnverifiedFlower, match="start_client_internal is not the verified"):
        runner.check_flower(changed, VERIFIED_FLOWER, runner.SUPERNODE_SOURCES)


class FakeClock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_supernode_waits_are_short_while_a_run_is_active_and_flowers_when_idle(monkeypatch):
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    waits = runner.patch_supernode()
    assert loop.time is waits
    clock = FakeClock()
    waits._clock = clock
    waits.sleep(3)  # a node that never handled a message polls as Flower does
    waits.sleep(0.5)  # a message in hand: its reply is checked for often
    waits.sleep(3)  # the next message of the run comes soon
    clock.now += runner.ACTIVE_SECONDS
    waits.sleep(3)  # a minute without a message: idle again
    waits.sleep(1.7)  # any other wait is Flower's own
    assert clock.slept == [3, runner.REPLY_CHECK_SECONDS, runner.ACTIVE_POLL_SECONDS, 3, 1.7]
    assert waits.monotonic() == clock.now  # the rest of `time` is the real one's


def test_superexec_polls_fast_only_after_launching_a_task(monkeypatch):
    monkeypatch.setenv(TASK_POLL_ENV, "1.0")
    monkeypatch.setattr(run_superexec, "time", run_superexec.time)
    monkeypatch.setattr(run_superexec, "_handle_launch_result", lambda *args: "handled")
    waits = runner.patch_superexec()
    clock = FakeClock()
    waits._clock = clock
    waits.sleep(1.0)  # idle: Flower's interval
    assert run_superexec._handle_launch_result("result", "task") == "handled"
    waits.sleep(1.0)  # a task was launched: the next one is looked for soon
    clock.now += runner.ACTIVE_SECONDS
    waits.sleep(1.0)
    assert clock.slept == [1.0, runner.ACTIVE_TASK_POLL_SECONDS, 1.0]
