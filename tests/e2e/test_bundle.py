"""A MONAI bundle federated end to end by `medfed simulate` (task = bundle): the bundle
written here, its own trainer and evaluator at every hospital on that hospital's data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from medfed.client.synthetic import generate_federation
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.protocol import Metric
from tests.bundles import write_bundle
from tests.conftest import SHOWN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Foreground Dice as the loss: on these tiny lesions it moves the evaluator's Dice within
# two rounds, where Dice + cross-entropy first learns to predict background everywhere.
DICE_LOSS = {
    "_target_": "DiceLoss",
    "to_onehot_y": True,
    "softmax": True,
    "include_background": False,
    "batch": True,
}


def _simulate(tmp_path, sites: int, *extra: str) -> tuple[dict, Bundle]:
    data = tmp_path / "data"
    generate_federation("segmentation", sites, data, seed=0, images_per_site=12, image_size=32)
    bundle = Bundle(write_bundle(tmp_path / "bundle", lr=0.01, loss=DICE_LOSS))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--task", "bundle",
         "-c", f"bundle={bundle.root}", "--data", str(data), "--sites", str(sites),
         "--rounds", "2", "-c", "local-epochs=2", "--out", str(out), *SHOWN, *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "metrics.json").read_text()), bundle


def _improves(metrics: dict) -> None:
    """The bundle evaluator's Dice, the run's headline, rises from the initial model's."""
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, last = (rounds[i]["global"][Metric.KEY_METRIC] for i in (0, -1))
    assert last > first, (first, last)
    assert all(r["global"][Metric.KEY_METRIC] == r["global"]["val-mean-dice"] for r in rounds)
    assert rounds[-1]["global"][Metric.LOSS] < rounds[0]["global"][Metric.LOSS]


def test_a_bundle_federates_and_its_key_metric_improves(tmp_path):
    metrics, bundle = _simulate(tmp_path, 2)
    assert metrics["status"] == "completed"
    _improves(metrics)
    assert all(r["replied"] == ["site-0", "site-1"] for r in metrics["rounds"])
    assert metrics["bundle"]["sha256"] == bundle.sha256
    model = json.loads((tmp_path / "run" / "model.json").read_text())
    assert model["task"] == "bundle" and model["bundle"]["sha256"] == bundle.sha256
    carried = Bundle(tmp_path / "run" / "bundle")  # what a hospital approves and exports
    assert carried.sha256 == bundle.sha256
    assert [p.name for p in carried.hashed_files()] == [p.name for p in bundle.hashed_files()]
    final = torch.load(tmp_path / "run" / "global_model.pt", weights_only=True)
    bundle.network().load_state_dict(final)  # the bundle's network_def rebuilds it
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Global validation key-metric" in report


def test_a_bundle_runs_under_secure_aggregation_and_fedprox(tmp_path):
    metrics, _ = _simulate(
        tmp_path, 3, "-c", "secure-aggregation=true", "-c", "strategy=fedprox",
        "-c", "proximal-mu=0.1",
    )  # fmt: skip
    assert metrics["status"] == "completed"
    _improves(metrics)
    assert all(r["secure-aggregation"]["survivors"] == 3 for r in metrics["rounds"][1:])
