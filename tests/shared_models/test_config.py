import math
import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from medfed.shared_models.config import FLOAT_RANGES, INT_RANGES, ConfigError, RunConfig, config_key
from medfed.shared_models.task_descriptions import TASK_NAMES

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_defaults_are_the_schema_defaults():
    # Flower flattens nested tables ([...config.dp] mode -> "dp.mode") as medfed's keys are.
    flower_defaults = flatten_dict(
        tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    )
    schema = RunConfig().to_mapping()
    assert flower_defaults == schema
    resolved = RunConfig.from_mapping(flower_defaults)
    assert (resolved.task, resolved.model) == ("segmentation", "unet")


def test_fedbn_takes_the_networks_that_bring_their_own_norm_layers():
    for model in ("densenet121", "resnet18"):
        values = {"task": "classification", "model": model, "strategy": "fedbn"}
        cfg = RunConfig.from_mapping(values)
        assert cfg.keeps_norms_local
    assert RunConfig.from_mapping({"strategy": "fedbn", "norm": "batch"}).keeps_norms_local
    assert not RunConfig.from_mapping({"norm": "batch"}).keeps_norms_local


def test_task_defaults_fill_model_and_classes():
    cfg = RunConfig.from_mapping({"task": "classification"})
    assert cfg.model == "smallcnn"
    assert cfg.classes == ("normal", "pneumonia", "covid")


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"num-server-rounds": 0}, "'num-server-rounds' = 0"),
        ({"num-server-rounds": -3}, "'num-server-rounds' = -3"),
        ({"task": "detection"}, "'task' = 'detection'"),
        ({"strategy": "fedsgd"}, "'strategy' = 'fedsgd'"),
        ({"model": "vgg"}, "'model' = 'vgg'"),
        ({"lr": "fast"}, "'lr' = 'fast'"),
        ({"image-size": 50}, "'image-size' = 50"),
        ({"val-fraction": 1.0}, "'val-fraction' = 1.0"),
        ({"class-names": "tumour"}, "'class-names' = 'tumour'"),
        ({"rounds": 3}, "unknown config key 'rounds'"),
        ({"norm": "group"}, "'norm' = 'group'"),
        ({"server-lr": 0.01}, "'server-lr' = 0.01: expected 0 unless strategy is fedadam"),
        ({"strategy": "fedbn"}, "'norm' = 'instance': expected 'batch' with strategy fedbn"),
        ({"task": "classification", "model": "densenet121", "norm": "batch"}, "'norm' = 'batch'"),
    ],
)
def test_bad_values_name_key_and_value(values, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        RunConfig.from_mapping(values)


def test_strings_from_the_command_line_are_coerced():
    cfg = RunConfig.from_mapping({"num-server-rounds": "4", "lr": "0.01", "channels-last": "true"})
    assert (cfg.num_server_rounds, cfg.lr, cfg.channels_last) == (4, 0.01, True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secure-aggregation": True, "strategy": "krum"}, "'strategy' = 'krum'"),
        ({"secure-aggregation": True, "strategy": "fedmedian"}, "weighted-mean strategy"),
        ({"secure-aggregation": True, "dp.mode": "server"}, "'dp.mode' = 'server'"),
        ({"dp.mode": "central"}, "'dp.mode' = 'central'"),
        ({"dp.mode": "client", "strategy": "fedtrimmedavg"}, "'dp.mode'"),
        ({"dp.clipping-norm": 0.0}, "'dp.clipping-norm'"),
        ({"dp.delta": 1.0}, "'dp.delta'"),
        ({"secagg-clipping-range": -1.0}, "'secagg-clipping-range'"),
        ({"secagg-quantization-bits": 32}, "'secagg-quantization-bits'"),
        ({"secagg-threshold": 1}, "'secagg-threshold'"),
        ({"dp.epsilon": 1.0}, "unknown config key 'dp.epsilon'"),
    ],
)
def test_privacy_settings_are_validated(values, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        RunConfig.from_mapping(values)


def test_task_names_are_the_registered_tasks():
    """The command line offers TASK_NAMES without importing torch; they must be the tasks."""
    from medfed.shared_models.tasks import TASKS

    assert set(TASK_NAMES) == set(TASKS)


@pytest.mark.parametrize("attr", sorted(INT_RANGES))
def test_every_integer_setting_has_an_upper_bound_named_in_its_error(attr):
    low, high = INT_RANGES[attr]
    key = config_key(attr)
    with pytest.raises(ConfigError, match=rf"'{key}' = {high + 1}: .*{low}\.\.{high}"):
        RunConfig.from_mapping({key: high + 1})
    below = low - 2  # not low - 1: 0 stands for the task's default in-channels and width
    with pytest.raises(ConfigError, match=rf"'{key}' = {below}: "):
        RunConfig.from_mapping({key: below})


@pytest.mark.parametrize("attr", sorted(FLOAT_RANGES))
@pytest.mark.parametrize("bad", ["above", "inf", "nan"])
def test_every_float_setting_is_finite_and_bounded(attr, bad):
    high = FLOAT_RANGES[attr][1]
    value = {"above": high * 2 + 1, "inf": math.inf, "nan": math.nan}[bad]
    key = config_key(attr)
    named = re.escape(f"'{key}' = {value!r}: expected a number in ")
    with pytest.raises(ConfigError, match=named + r"[\[(].*" + re.escape(f"{high!r}]")):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"image-size": 4096}, "'image-size' = 4096: expected 16..2048"),
        ({"task": "segmentation3d", "image-size": 1024}, "'image-size' = 1024: expected 16..512"),
        ({"patch-size": -8}, "'patch-size' = -8"),
        ({"seed": -1}, "'seed' = -1"),
        ({"seed": 2**32}, f"'seed' = {2**32}"),
        ({"spacing": "inf,1"}, "'spacing' = 'inf,1'"),
        ({"spacing": "1000,1"}, "'spacing' = '1000,1'"),
        ({"ct-window": "-inf,0"}, "'ct-window' = '-inf,0'"),
        ({"modality": "C T"}, "'modality' = 'C T'"),
        ({"class-names": ",".join(f"c{i}" for i in range(1001))}, "'class-names' = '1001 names'"),
    ],
)
def test_sizes_and_strings_have_bounds(values, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        RunConfig.from_mapping(values)


@pytest.mark.parametrize(
    ("values", "protection"),
    [
        ({"secure-aggregation": True, "min-nodes": 3}, "secure-aggregation = true"),
        ({"dp.mode": "client"}, "dp.mode = 'client'"),
        ({"dp.mode": "server"}, "dp.mode = 'server'"),
    ],
)
def test_cross_site_all_is_refused_under_secure_aggregation_or_dp(values, protection):
    """'all' would send each hospital's un-aggregated local model to the other hospitals."""
    expected = f"'cross-site' = 'all': expected 'global' or 'off' with {protection}: "
    with pytest.raises(ConfigError, match=re.escape(expected) + ".*would defeat it"):
        RunConfig.from_mapping({**values, "cross-site": "all"})
    assert RunConfig.from_mapping({**values, "cross-site": "global"}).cross_site == "global"


def test_cross_site_all_names_both_protections_it_would_defeat():
    with pytest.raises(
        ConfigError,
        match=re.escape("secure-aggregation = true and dp.mode = 'client'") + ".*defeat them",
    ):
        RunConfig.from_mapping(
            {"secure-aggregation": True, "dp.mode": "client", "cross-site": "all"}
        )


def test_cross_site_takes_its_three_modes_only():
    assert RunConfig.from_mapping({"cross-site": "all"}).cross_site == "all"
    with pytest.raises(ConfigError, match="'cross-site' = 'every': expected one of off, global"):
        RunConfig.from_mapping({"cross-site": "every"})
