"""`medfed operator connect`'s entry in Flower's config (issue 25): it adds the
coordinator's connection and never takes Flower's default from `local`."""

from __future__ import annotations

import tomllib

from flwr.cli.flower_config import read_superlink_connection

from medfed.server.coordinator.operator_link import write_connection


def test_a_first_config_keeps_flowers_local_default_beside_the_coordinator(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_connection(tmp_path, "consortium", 9093)
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "local"
    assert read_superlink_connection(None).name == "local", "`flwr run .` stays local"
    consortium = read_superlink_connection("consortium")
    assert consortium.address == "127.0.0.1:9093" and consortium.insecure


def test_an_existing_default_and_connections_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "lab"\n[superlink.lab]\naddress = "10.0.0.1:9093"\n'
    )
    write_connection(tmp_path, "consortium", 9095)
    assert read_superlink_connection(None).name == "lab"
    assert read_superlink_connection("lab").address == "10.0.0.1:9093"
    assert read_superlink_connection("consortium").address == "127.0.0.1:9095"
