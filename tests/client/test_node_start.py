"""`medfed node start` as a hospital runs it: what the SuperNode it supervises is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client import app_runner, approval, node, warm_worker


@pytest.fixture
def started(tmp_path, seg_sites, supervised):
    """Run `start_node` on a usable site up to the point it would supervise its services;
    returns the services it would have started."""
    assert node.start_node(_options(tmp_path, seg_sites)) == 0
    return supervised


def _options(tmp_path, seg_sites, **changes) -> node.NodeOptions:
    """A local test node on a usable site, with `changes` to its options."""
    return node.NodeOptions(
        coordinator="127.0.0.1:1",
        ca=None,
        key=None,
        data=seg_sites / "site-0",
        name="site-0",
        state=tmp_path / "state",
        insecure=True,
        **changes,
    )


def test_the_supernode_never_inherits_flowers_internal_api_switches(started):
    """FLWR_INTERNAL_GRPC_* would open Flower's legacy gRPC APIs on every interface, past
    the proxy: the node's SuperNode, its warm worker and its ClientApp processes never
    get them."""
    for service in started:
        assert not [k for k in service.env if k.startswith("FLWR_INTERNAL_")]


def test_the_supernode_runs_only_approved_apps(started, tmp_path):
    """Its ClientApp processes are medfed's approving runner, with the node's state, both
    relayed to the warm worker and in the worker's forks."""
    worker, supernode = started
    for service in (worker, supernode):
        first = service.env["PATH"].split(":")[0]
        assert Path(first) == tmp_path / "state" / "bin"
        assert service.env[approval.STATE_ENV] == str((tmp_path / "state").resolve())


def test_the_node_supervises_a_warm_worker_it_restarts(started, tmp_path):
    """The SuperNode's `flwr-clientapp` relays to the worker's socket; the worker is
    restarted if it ends, and `--cold` leaves Flower's fresh processes."""
    worker, supernode = started
    assert worker.command[-2:] == ["medfed.client.warm_worker", str((tmp_path / "state").resolve())]
    assert worker.restart is not None and supernode.restart is None
    socket = str(warm_worker.socket_path((tmp_path / "state").resolve()))
    assert supernode.env[app_runner.SOCKET_ENV] == socket
    assert supernode.command[1:3] == ["-m", "medfed.client.supernode_runner"]


def test_cold_and_flower_waits_give_flowers_own_node_back(tmp_path, seg_sites, supervised):
    assert node.start_node(_options(tmp_path, seg_sites, warm=False, flower_waits=True)) == 0
    (supernode,) = supervised
    assert app_runner.SOCKET_ENV not in supernode.env
    assert Path(supernode.command[0]).name == "flower-supernode"


def test_the_hospitals_own_policy_reaches_its_clientapps(tmp_path, seg_sites, supervised):
    """`--require-secure-aggregation` is in the node config every ClientApp reads."""
    assert node.start_node(_options(tmp_path, seg_sites, require_secure_aggregation=True)) == 0
    _, supernode = supervised
    config = supernode.command[supernode.command.index("--node-config") + 1]
    assert "require-secure-aggregation=true" in config.split()
