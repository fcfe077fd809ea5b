"""A node's `--node-config` and `medfed node start` options: bounds and errors naming them."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

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


def test_node_start_runs_medfeds_superexec_which_polls_fast_only_while_active(
    tmp_path, monkeypatch, seg_sites
):
    """Every message waits for the SuperExec's poll before its ClientApp starts: the
    SuperNode finds medfed's `flower-superexec` first on its PATH (client/supernode_runner:
    0.1 s while a run is active, the configured interval, Flower's 1 s, when idle);
    `--flower-waits` leaves Flower's own."""
    started: list[runtime.Service] = []
    monkeypatch.setattr(runtime, "supervise", lambda services, **_: started.extend(services) or 0)
    monkeypatch.delenv(TASK_POLL_ENV, raising=False)
    options = NodeOptions("127.0.0.1:9092", None, None, seg_sites / "site-0", "site-0",
                          insecure=True, state=tmp_path / "state")  # fmt: skip
    assert start_node(options) == 0
    supernode = next(s for s in started if s.restart is None)  # (not the warm worker)
    found = shutil.which("flower-superexec", path=supernode.env["PATH"])
    assert found == str(tmp_path / "state" / "bin" / "flower-superexec")
    assert "superexec_main" in Path(found).read_text() and TASK_POLL_ENV not in supernode.env
    started.clear()
    (tmp_path / "state" / "bin" / "flower-superexec").unlink()
    assert start_node(dataclasses.replace(options, flower_waits=True)) == 0
    supernode = next(s for s in started if s.restart is None)
    assert Path(shutil.which("flower-superexec", path=supernode.env["PATH"])).parent != (
        tmp_path / "state" / "bin"
    )
