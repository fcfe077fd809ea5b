"""A node's `--node-config` and `medfed node start` options: bounds and errors naming them."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client import settings as message_settings
from medfed.client.app import app
from medfed.client.node import TASK_POLL_ENV, NodeOptions, start_node
from medfed.client.safe_errors import error_report
from medfed.client.settings import (
    DEFAULT_FLOOR,
    SIMULATED_FLOOR,
    NodeConfigError,
    NodeSettings,
)
from medfed.client.synthetic import generate_site
from medfed.shared_models import supervision
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, ErrorCode, NodeConfig
from medfed.shared_models.tasks import TASKS
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.conftest import tiny_config


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
    started: list[supervision.Service] = []
    monkeypatch.setattr(
        supervision, "supervise", lambda services, **_: started.extend(services) or 0
    )
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


def test_one_training_message_parses_the_run_config_and_the_node_settings_once(
    tmp_path, monkeypatch
):
    """The mods (round guard, count floor, DP clipping) and the handler of one message all
    read both; each is parsed and checked once, and the second message with the same values
    parses nothing again."""
    site = generate_site("classification", 0, tmp_path / "site", images_per_site=12, image_size=32)
    cfg = RunConfig.from_mapping(
        {**tiny_config(task="classification", local_epochs=1).to_mapping(), "dp.mode": "client"}
    )
    model = {
        k: v.numpy() for k, v in TASKS["classification"].build_network(cfg).state_dict().items()
    }
    parsed: list[str] = []
    for cls, name in ((RunConfig, "run config"), (NodeSettings, "node settings")):
        original = cls.from_mapping.__func__

        def counting(klass, values, *args, _original=original, _name=name, **kwargs):
            parsed.append(_name)
            return _original(klass, values, *args, **kwargs)

        monkeypatch.setattr(cls, "from_mapping", classmethod(counting))
    message_settings._PARSED.clear()
    node = {NodeConfig.DATA_PATH: str(site), NodeConfig.MIN_COUNT: 1,
            NodeConfig.CACHE_DIR: str(tmp_path / "cache")}  # fmt: skip
    ctx = Context(RUN_ID, 5, node, RecordDict(), {**cfg.to_mapping(), "stats-min-count": 1})
    clipping = {Config.SERVER_ROUND: 1, KEY_CLIPPING_NORM: cfg.dp_clipping_norm}
    reply = app(incoming("train", clipping, model), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert sorted(parsed) == ["node settings", "run config"]
    moved = {k: v + 0.01 if v.dtype.kind == "f" else v for k, v in model.items()}  # round 2's
    reply = app(incoming("train", {**clipping, Config.SERVER_ROUND: 2}, moved), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert sorted(parsed) == ["node settings", "run config"]
