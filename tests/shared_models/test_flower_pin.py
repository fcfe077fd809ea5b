"""Flower's object pulls retry sooner inside medfed's processes, only on the verified
Flower (shared_models/flower_pin.py)."""

from __future__ import annotations

import functools
import inspect

import flwr
import pytest
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from medfed.client import app_runner, supernode_runner
from medfed.server.run import exchange
from medfed.shared_models import flower_pin
from medfed.shared_models.flower_pin import (
    PULL_FIRST_RETRY,
    UnverifiedFlower,
    check_flower,
    shorten_object_pulls,
)

# Where each of medfed's processes replaces Flower's pull: (module, name, the callers' digests).
PULLS = [
    (run_clientapp, "pull_and_inflate_object_from_tree", app_runner.PULLERS),
    (start_client_internal, "pull_objects", supernode_runner.SUPERNODE_PULLERS),
    (http_grid, "pull_objects", exchange.REPLY_PULLERS),
]


@pytest.mark.parametrize("module, name, callers", PULLS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_pull_is_called_where_it_was_verified(module, name, callers):
    """Breaks when Flower's code there changes: re-read it, then update the digests."""
    check_flower(module, flwr.__version__, callers)
    for caller in callers:
        source = inspect.getsource(functools.reduce(getattr, caller.split("."), module))
        assert f"{name}(" in source and "initial_backoff" not in source


@pytest.mark.parametrize("module, name, callers", PULLS, ids=lambda p: getattr(p, "__name__", ""))
def test_a_shortened_pull_retries_sooner_than_flowers_second(monkeypatch, module, name, callers):
    monkeypatch.setattr(module, name, getattr(module, name))
    assert inspect.signature(getattr(module, name)).parameters["initial_backoff"].default == 1
    shorten_object_pulls(module, name, callers)
    shorten_object_pulls(module, name, callers)  # twice in one process: no double wrap
    pull = getattr(module, name)
    assert isinstance(pull, functools.partial) and not isinstance(pull.func, functools.partial)
    assert pull.keywords["initial_backoff"] == PULL_FIRST_RETRY <= 0.1


def test_another_flower_or_a_changed_caller_is_refused():
    original = http_grid.pull_objects
    with pytest.raises(UnverifiedFlower, match=r"flwr 1\.43\.0 is installed"):
        check_flower(http_grid, "1.43.0", exchange.REPLY_PULLERS)
    changed = {"HttpGrid.pull_messages": "0" * 64}
    with pytest.raises(UnverifiedFlower, match=r"HttpGrid\.pull_messages is not the verified"):
        shorten_object_pulls(http_grid, "pull_objects", changed)
    assert http_grid.pull_objects is original  # refused: nothing replaced


def test_the_clientapp_process_exits_on_an_unverified_flower(monkeypatch):
    monkeypatch.setattr(flower_pin, "VERIFIED_FLOWER", "0.0.0")
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree",
                        run_clientapp.pull_and_inflate_object_from_tree)  # fmt: skip
    with pytest.raises(SystemExit, match=r"waits on flwr 0\.0\.0 only"):
        app_runner.shorten_message_pull()


def test_the_deployed_grid_only_is_changed(monkeypatch):
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    exchange.quicken_reply_pulls(object())  # a simulation's grid pulls no objects
    assert not isinstance(http_grid.pull_objects, functools.partial)
