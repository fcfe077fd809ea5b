"""Which Ray a simulation's hospitals run on: addresses checked before anything starts,
and kept by --resume. (The run on a real two-node cluster: tests/e2e/test_ray_cluster.py.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import tomli_w

from medfed.server.cli import main
from medfed.server.simulation import ray_cluster
from medfed.server.simulation.simulate import FEDERATION, resumed
from medfed.shared_models.config import ConfigError
from medfed.shared_models.supervision import free_port


@pytest.fixture
def listening() -> Iterator[str]:
    """An address something answers at (a plain listening socket)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_local_is_a_private_ray_and_an_answering_address_is_kept(listening):
    assert ray_cluster.resolve("local") == "local"
    assert ray_cluster.resolve(listening) == listening


def test_an_address_where_nothing_answers_is_named():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=f"--ray-address {address}: no Ray cluster answers"):
        ray_cluster.resolve(address)
    with pytest.raises(ConfigError, match="--ray-address head-node: expected HOST:PORT"):
        ray_cluster.resolve("head-node")
    with pytest.raises(ConfigError, match="Ray Client addresses are not supported"):
        ray_cluster.resolve("ray://head-node:10001")


def test_auto_takes_ray_address_else_what_ray_start_recorded(monkeypatch, tmp_path, listening):
    monkeypatch.setenv("RAY_ADDRESS", listening)
    assert ray_cluster.resolve("auto") == listening
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records its address
    with pytest.raises(ConfigError, match="--ray-address auto: no cluster found"):
        ray_cluster.resolve("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(listening)
    assert ray_cluster.resolve("auto") == listening


def test_resume_joins_the_cluster_the_run_was_simulated_on(tmp_path):
    (tmp_path / FEDERATION).write_text(
        tomli_w.dumps({"sites": 2, "cpus-per-site": 1, "ray-address": "10.0.0.5:6379"})
    )
    assert resumed(tmp_path, {}).ray_address == "10.0.0.5:6379"
    (tmp_path / FEDERATION).write_text(tomli_w.dumps({"sites": 2, "cpus-per-site": 1}))
    assert resumed(tmp_path, {}).ray_address == "local", "runs recorded before: private Ray"


def test_resume_checks_the_recorded_cluster_unless_told_another(tmp_path, capsys):
    recorded, moved = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    (tmp_path / FEDERATION).write_text(
        tomli_w.dumps({"sites": 2, "cpus-per-site": 1, "ray-address": recorded})
    )
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert f"--ray-address {recorded}: no Ray cluster answers" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path), "--ray-address", moved]) == 2
    assert f"--ray-address {moved}: no Ray cluster answers" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [FEDERATION], "nothing written"
