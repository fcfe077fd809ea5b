"""Every new task federated end to end (2 sites, 2 rounds, tiny sizes), plus GAN tooling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import SHOWN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CASES = {
    # task: (extra run-config, synthetic images per site, metric, higher is better)
    "segmentation3d": (["-c", "image-size=16", "-c", "model-width=4", "-c", "model-depth=2",
                        "-c", "lr=0.01", "-c", "local-epochs=3"], 10, "dice", True),
    "regression": (["-c", "image-size=32", "-c", "model-width=8", "-c", "model-depth=2",
                    "-c", "lr=0.01"], 24, "mae", False),
    "gan": (["-c", "image-size=32", "-c", "model-width=8", "-c", "model-depth=2",
             "-c", "lr=0.002", "-c", "local-epochs=3"], 24, "fid", False),
}  # fmt: skip


def _simulate(out, task, extra, images, rounds=2):
    return subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--task", task, "--sites", "2",
         "--rounds", str(rounds), "--images-per-site", str(images), "--out", str(out),
         *SHOWN, *extra],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan") / "run"
    extra, images, _, _ = CASES["gan"]
    result = _simulate(out, "gan", extra, images)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.parametrize("task", ["segmentation3d", "regression"])
def test_task_federates_and_improves(tmp_path, task):
    extra, images, metric, higher = CASES[task]
    if task == "regression":  # also: a classifier's frozen backbone under a trained head
        weights = _classifier_weights(tmp_path)
        extra = [*extra, "-c", f"pretrained-weights={weights}", "-c", "freeze=backbone"]
    result = _simulate(tmp_path / "run", task, extra, images)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    first, last = (metrics["rounds"][i]["global"][metric] for i in (0, -1))
    assert (last > first) if higher else (last < first), (first, last)
    assert all(r["replied"] == ["site-0", "site-1"] for r in metrics["rounds"])
    if task == "segmentation3d":
        assert {"hd95", "hd95-edema", "dice-enhancing"} <= set(metrics["rounds"][-1]["global"])
    if task == "regression":
        assert "tensors loaded" in result.stdout
        transfer = metrics["pretrained"]
        assert transfer["loaded"] > 0
        assert set(transfer["skipped"]) == {"final.1.weight", "final.1.bias"}
        source = torch.load(weights, weights_only=True)
        final = torch.load(tmp_path / "run" / "global_model.pt", weights_only=True)
        frozen = [k for k in final if not k.startswith("final.") and k.endswith("weight")]
        # FedAvg of identical backbones equals them up to float32 rounding
        assert frozen and all(
            torch.allclose(final[k], source[k], rtol=1e-5, atol=1e-7) for k in frozen
        )


def _classifier_weights(tmp_path):
    """A classifier with the regression run's backbone shape, saved as a state dict."""
    from medfed.shared_models.config import RunConfig
    from medfed.shared_models.tasks import TASKS

    shape = {"image-size": 32, "model-width": 8, "model-depth": 2}
    net = TASKS["classification"].build_network(
        RunConfig.from_mapping({"task": "classification", **shape})
    )
    torch.save(net.state_dict(), tmp_path / "classifier.pt")
    return tmp_path / "classifier.pt"


def test_gan_federates_and_fid_improves(gan_run):
    metrics = json.loads((gan_run / "metrics.json").read_text())
    first, last = (metrics["rounds"][i]["global"] for i in (0, -1))
    assert last["fid"] < first["fid"]
    assert 0.0 <= last["tstr-accuracy"] <= 1.0
    assert (gan_run / "plots" / "predictions.png").is_file()
    said = f"TSTR accuracy {last['tstr-accuracy']:.2f}, chance 0.33: a classifier trained only"
    assert said in (gan_run / "progress.log").read_text(), "what the number means, said"


def test_gan_sample_writes_the_requested_images(gan_run, tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "gan", "sample", "--model", str(gan_run),
         "--n", "5", "--class", "covid", "--out", str(out)], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("covid-*.png")) == [
        f"covid-{i:04d}.png" for i in range(5)
    ]
    assert (out / "grid.png").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "gan", "sample", "--model", str(gan_run),
         "--n", "2", "--class", "fracture", "--out", str(out)], capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "not one of the gan's classes (0 normal, 1 pneumonia, 2 covid)" in bad.stderr


def test_classification_with_gan_augmentation(gan_run, tmp_path):
    extra = ["-c", "image-size=32", "-c", "model-width=8", "-c", "model-depth=2",
             "-c", f"gan-model={gan_run}", "-c", "gan-augment-ratio=0.5",
             "-c", "val-fraction=0.5"]  # fmt: skip
    # 40 images a site, half for validation: both splits clear the sites' floor of 10
    result = _simulate(tmp_path / "run", "classification", extra, 40, rounds=1)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    sites = metrics["rounds"][-1]["sites"]
    generated = [sites[s]["generated-images"] for s in ("site-0", "site-1")]
    train_sizes = [sites[s]["train-examples"] for s in ("site-0", "site-1")]
    assert generated == [round(0.5 * n) for n in train_sizes] and min(train_sizes) >= 10
