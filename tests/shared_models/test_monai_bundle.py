"""A MONAI bundle as the run config names it: validation, errors naming the file and key,
the hash every node checks, the network both sides build, the keys a site overrides."""

from __future__ import annotations

import json

import pytest
import torch

from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.monai_bundle import DATASET_DIR, DEVICE, TRAIN_DATA, VAL_DATA, Bundle
from medfed.shared_models.protocol import Metric
from medfed.shared_models.tasks import TASKS
from tests.bundles import train_config, validate_section, write_bundle


def _config(**values) -> RunConfig:
    return RunConfig.from_mapping({"task": "bundle", **values})


def test_a_bundle_run_needs_only_the_bundle(tmp_path):
    cfg = _config(bundle=str(tmp_path))
    assert cfg.model == "network_def" and cfg.classes == ()
    assert TASKS["bundle"].headline_metric == Metric.KEY_METRIC


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"task": "bundle"}, "'bundle' = ''"),
        ({"task": "segmentation", "bundle": "/b"}, "'bundle' = '/b'"),
        ({"task": "bundle", "bundle": "/b", "strategy": "fedbn"}, "'strategy' = 'fedbn'"),
        ({"task": "bundle", "bundle": "/b", "freeze": "backbone"}, "'freeze' = 'backbone'"),
        ({"task": "bundle", "bundle": "/b", "norm": "batch"}, "'norm' = 'batch'"),
    ],
)
def test_bundle_settings_are_checked_naming_the_key(values, named):
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_mapping(values)


def _broken(tmp_path, **changes) -> str:
    """The error of a bundle whose train.json has `changes` (None drops a key)."""
    write_bundle(tmp_path, **changes)
    with pytest.raises(ConfigError) as caught:
        Bundle(tmp_path)
    return str(caught.value)


def test_a_missing_bundle_or_train_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'bundle' = '.*nowhere': not a folder"):
        Bundle(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"configs/train.json: missing"):
        Bundle(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"configs/train.json: not a readable bundle config"):
        Bundle(tmp_path)


def test_each_missing_key_is_named_with_its_file(tmp_path):
    message = _broken(tmp_path / "a", network_def=None)
    assert "configs/train.json: no 'network_def'" in message
    train = train_config(0.01)["train"]
    train["dataset"] = "@some_dataset"  # a dataset medfed cannot hand a site's datalist
    message = _broken(tmp_path / "b", train=train)
    assert "configs/train.json: no 'train#dataset#data'" in message
    validate = {"evaluator": {"_target_": "SupervisedEvaluator"}}
    message = _broken(tmp_path / "c", validate=validate)
    assert "'validate#evaluator' but no 'validate#dataset#data'" in message


def test_a_network_def_that_is_no_network_is_refused_by_name(tmp_path):
    Bundle(write_bundle(tmp_path / "a", network_def=42))  # reading runs nothing
    with pytest.raises(ConfigError, match=r"train.json: 'network_def' is a int, not a torch"):
        Bundle(tmp_path / "a").network()
    broken = {"_target_": "NoSuchNetwork"}
    with pytest.raises(ConfigError, match=r"train.json: 'network_def' could not be built"):
        Bundle(write_bundle(tmp_path / "b", network_def=broken)).network()


def test_server_and_hospitals_build_the_same_network_from_network_def(tmp_path):
    cfg = _config(bundle=str(write_bundle(tmp_path)))
    torch.manual_seed(0)
    server = TASKS["bundle"].build_network(cfg)
    hospital = Bundle(cfg.bundle).network()
    assert server.state_dict().keys() == hospital.state_dict().keys()
    assert type(server).__name__ == "UNet" and server.out_channels == 3
    assert type(TASKS["bundle"].build_loss(cfg)).__name__ == "DiceCELoss"


def test_the_hash_covers_configs_and_scripts_only(tmp_path):
    bundle = Bundle(write_bundle(tmp_path))
    first = bundle.sha256
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights change as the bundle trains")
    assert Bundle(tmp_path).sha256 == first
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "losses.py").write_text("CUSTOM = 1\n")
    with_code = Bundle(tmp_path)
    assert with_code.sha256 != first and "scripts/losses.py" in with_code.identity()["files"]
    write_bundle(tmp_path, lr=0.02)  # one value of train.json
    assert Bundle(tmp_path).sha256 not in (first, with_code.sha256)


def test_a_different_hash_is_refused_naming_the_bundle(tmp_path):
    bundle = Bundle(write_bundle(tmp_path))
    bundle.check_hash(bundle.sha256)
    with pytest.raises(ConfigError, match=r"'bundle' = '.*': this node's bundle configs hash"):
        bundle.check_hash("0" * 64)


def test_site_overrides_point_the_bundle_at_the_site(tmp_path):
    bundle = Bundle(write_bundle(tmp_path / "bundle"))
    train, val = [{"image": "/s/a.nii.gz"}], [{"image": "/s/b.nii.gz"}]
    overrides = bundle.site_overrides(tmp_path / "site", train, val, "cpu", evaluation=True)
    assert overrides[DATASET_DIR] == str(tmp_path / "site")
    assert overrides[TRAIN_DATA] == train and overrides[VAL_DATA] == val
    assert overrides[DEVICE] == "$torch.device('cpu')"
    # a bundle without a validation section has no validation data key to set
    plain = Bundle(write_bundle(tmp_path / "plain", evaluator=False))
    assert VAL_DATA not in plain.site_overrides(tmp_path, train, val, "cpu", evaluation=True)


def test_evaluate_json_is_merged_over_train_json(tmp_path):
    write_bundle(tmp_path, evaluator=False)
    evaluate = {"validate": validate_section()}
    (tmp_path / "configs" / "evaluate.json").write_text(json.dumps(evaluate))
    bundle = Bundle(tmp_path)
    assert bundle.has_evaluator and bundle.eval_files[-1] == "configs/evaluate.json"
    assert "configs/evaluate.json" in bundle.identity()["files"]
