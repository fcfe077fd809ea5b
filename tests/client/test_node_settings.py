"""A node's `--node-config` and `medfed node start` options: bounds and errors naming them."""

import re
from pathlib import Path

import pytest
from flwr.supercore.superexec import run_superexec

from medfed.client.app import error_report
from medfed.client.node import TASK_POLL_ENV, NodeOptions, start_node
from medfed.client.node_settings import (
    DEFAULT_FLOOR,
    SIMULATED_FLOOR,
    NodeConfigError,
    NodeSettings,
)
from medfed.shared_models import runtime
from medfed.shared_models.protocol import ErrorCode


def test_a_node_started_without_settings_gets_the_defaults():
    settings = NodeSettings.from_mapping({})
    assert settings == NodeSettings(min_count=DEFAULT_FLOOR)


def test_a_simulated_node_leaves_the_floor_to_the_run():
    """The researcher holds every simulated site's data: the run's `stats-min-count`
    (default 10) is the floor there; a deployed node keeps its own unless it sets one."""
    simulated = {"partition-id": 0, "num-partitions": 2}
    assert NodeSettings.from_mapping(simulated).min_count == SIMULATED_FLOOR == 1
    assert NodeSettings.from_mapping({**simulated, "min-count": 30}).min_count == 30
    assert NodeSettings.from_mapping({"data-path": "/data"}).min_count == DEFAULT_FLOOR == 10


def test_settings_are_read_with_their_types():
    settings = NodeSettings.from_mapping(
        {
            "data-path": " /data/site ",
            "site-name": "hospital-a",
            "device": "cuda:1",
            "loader-workers": "4",
            "min-count": 25,
            "partition-id": 2,
            "num-partitions": 3,
            "something-else": ["left", "alone"],
        }
    )
    assert settings.data_path == Path("/data/site")
    assert (settings.site_name, settings.device) == ("hospital-a", "cuda:1")
    assert (settings.loader_workers, settings.min_count, settings.partition) == (4, 25, (2, 3))


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"min-count": 0}, "'min-count' = 0: expected an integer in 1..1000000"),
        ({"min-count": 10**7}, "'min-count' = 10000000"),
        ({"min-count": "ten"}, "'min-count' = 'ten'"),
        ({"min-count": "²"}, "'min-count' = '²'"),
        ({"min-count": True}, "'min-count' = True"),
        ({"loader-workers": -1}, "'loader-workers' = -1: expected an integer in 0..64"),
        ({"loader-workers": 1000}, "'loader-workers' = 1000"),
        ({"device": "gpu"}, "'device' = 'gpu': expected auto, cpu, cuda or cuda:N"),
        ({"site-name": "../srv"}, "'site-name' = '../srv'"),
        ({"data-path": ""}, "'data-path' = '': expected a non-empty string"),
        ({"cache-dir": 3}, "'cache-dir' = 3"),
        ({"data-path": "x" * 5000}, "'data-path' = 'xxxx"),
        ({"partition-id": 0}, "'num-partitions' = None"),
        (
            {"partition-id": 3, "num-partitions": 3},
            "'partition-id' = 3: expected an integer in 0..2",
        ),
    ],
)
def test_bad_node_config_names_key_and_value(values, named):
    with pytest.raises(NodeConfigError, match=re.escape(f"node config key {named}")):
        NodeSettings.from_mapping(values)


def test_a_node_config_error_reaches_the_coordinator_without_its_value():
    try:
        NodeSettings.from_mapping({"min-count": "/srv/images/patient-7"})
    except NodeConfigError as err:
        code, text = error_report(err)
    assert code == ErrorCode.CONFIG
    assert "/srv" not in text and "node config" in text


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"min_count": 0}, "--min-count: node config key 'min-count' = 0"),
        ({"name": "a b"}, "--name: node config key 'site-name' = 'a b'"),
        ({"device": "tpu"}, "--device: node config key 'device' = 'tpu'"),
        ({"runtime_port": 70000}, "--runtime-port 70000: expected 1..65535"),
    ],
)
def test_node_start_refuses_bad_options_before_anything_starts(tmp_path, change, named):
    values = {"name": "site-a", "insecure": True, "state": tmp_path / "state", **change}
    options = NodeOptions("127.0.0.1:9092", None, None, tmp_path / "site", **values)
    with pytest.raises(NodeConfigError, match=re.escape(named)):
        start_node(options)
    assert not (tmp_path / "state").exists()


def test_node_start_has_its_superexec_look_for_tasks_every_tenth_of_a_second(
    tmp_path, monkeypatch, seg_sites
):
    """Every message waits for this poll before its ClientApp starts (Flower: 1 s); an
    operator's own setting wins, and Flower reads the variable medfed sets."""
    started: list[runtime.Service] = []
    monkeypatch.setattr(runtime, "supervise", lambda services, **_: started.extend(services) or 0)
    monkeypatch.delenv(TASK_POLL_ENV, raising=False)
    options = NodeOptions("127.0.0.1:9092", None, None, seg_sites / "site-0", "site-0",
                          insecure=True, state=tmp_path / "state")  # fmt: skip
    assert start_node(options) == 0
    monkeypatch.setenv(TASK_POLL_ENV, "0.5")
    assert start_node(options) == 0
    assert [service.env[TASK_POLL_ENV] for service in started] == ["0.1", "0.5"]
    monkeypatch.setenv(TASK_POLL_ENV, started[0].env[TASK_POLL_ENV])
    assert run_superexec._get_task_poll_interval() == 0.1
