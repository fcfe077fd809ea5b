"""Real federations: a SuperLink in simulation mode, `flwr run`, Ray workers.

Every process is started on 127.0.0.1 and stopped by pid by the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from medfed.server.run.hidden_counts import HIDDEN
from medfed.server.simulation.simulate import flwr_run, simulation_superlink
from medfed.shared_models.run_folder import load_global_model
from tests.conftest import BRAIN, SHOWN, relabelled_sites

pytestmark = pytest.mark.e2e

TINY_RUN = ["-c", "image-size=32", "-c", "model-width=4", "-c", "model-depth=2",
            "-c", "lr=0.01", "-c", "batch-size=4", *SHOWN]  # fmt: skip


def _no_stray_processes(marker: str) -> bool:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return found.strip() == ""


def test_simulated_federation_learns_and_leaves_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--sites", "3", "--rounds", "2",
         "--images-per-site", "24", "--out", str(out), *TINY_RUN],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 2/2 | sites 3/3" in result.stdout
    assert f"report: {out / 'report.md'}" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for entry in metrics["rounds"]:
        assert entry["replied"] == ["site-0", "site-1", "site-2"]
        assert entry["failed"] == []
        assert set(entry["sites"]) == {"site-0", "site-1", "site-2"}
        assert {"dice", "dice-edema", "dice-tumour", "loss"} <= set(entry["global"])
    assert metrics["rounds"][-1]["global"]["dice"] > metrics["rounds"][0]["global"]["dice"]
    assert metrics["config"]["num-server-rounds"] == 2

    for name in (
        "report.md",
        "plots/global.png",
        "plots/sites.png",
        "plots/predictions.png",
        "checkpoints/round-000.pt",
        "checkpoints/round-002.pt",
        "progress.log",
    ):
        assert (out / name).is_file(), name
    # report.md written once, by this command, with the predictions it drew (the ServerApp
    # left a completed run's report to it)
    assert "wrote report.md" not in (out / "progress.log").read_text()
    assert "![predictions](plots/predictions.png)" in (out / "report.md").read_text()
    cfg, net = load_global_model(out)
    assert cfg.image_size == 32
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    checkpoint = torch.load(out / "checkpoints" / "round-002.pt", weights_only=True)
    for key, value in checkpoint["arrays"].items():
        assert torch.equal(value, net.state_dict()[key])
    assert _no_stray_processes(str(out / "run-config.toml"))
    # the command stopped Flower at the ServerApp's last line instead of waiting for its
    # wind-down: nothing the run wrote is missing (above), and the log ends there
    flower_log = (out / "logs" / "flower-run.log").read_text().strip().splitlines()
    assert flower_log[-1].endswith(f"[medfed-end] {out}")


@pytest.mark.slow
def test_classes_from_the_sites_are_the_runs_own(tmp_path, seg_sites):
    """Sites labelled background/brain and no class-names: the run takes the sites' two
    classes, records them and trains a network with two outputs."""
    data = relabelled_sites(seg_sites, tmp_path / "data", [BRAIN, BRAIN])
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--data", str(data),
         "--rounds", "1", "--out", str(out), *TINY_RUN],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "classes from the sites' dataset.json: background, brain" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["class-names"] == "background,brain"
    assert "dice-brain" in metrics["rounds"][-1]["global"]
    cfg, net = load_global_model(out)  # model.json
    assert cfg.classes == ("background", "brain")
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.slow
def test_broken_files_are_skipped_counted_and_statistics_shared(tmp_path, seg_sites):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(seg_sites, data)
    for site in ("site-1", "site-2"):  # alike but for their numbers: Ray merged them
        (data / site / "imagesTr" / "case_0002.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "run"
    overrides = (
        f"num-server-rounds=1 data-root='{data}' out-dir='{out}' image-size=32 "
        "model-width=4 model-depth=2 stats-min-count=5"
    )
    with simulation_superlink(tmp_path / "logs") as (env, _port):
        flwr_run(overrides, sites=3, cpus_per_site=1, env=env, log_file=tmp_path / "run.log")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    last = metrics["rounds"][-1]
    assert last["replied"] == ["site-0", "site-1", "site-2"]
    # one skipped file is below the sites' floor (5): the coordinator learns only that
    skipped = [last["sites"][s]["skipped-files"] for s in ("site-0", "site-1", "site-2")]
    assert skipped == [0, HIDDEN, HIDDEN]
    log = (tmp_path / "run.log").read_text()
    for site in ("site-1", "site-2"):  # each hospital's own line, none merged away
        assert f"[medfed] {site}: skipped" in log, site
    stats = metrics["site-statistics"]
    assert set(stats) == {"site-0", "site-1", "site-2"}
    for site, summary in stats.items():
        assert summary["min-count"] == 5, "a simulated site's floor is the run's"
        assert all(v == HIDDEN or v >= 5 for v in summary["label-histogram"]), site
        assert len(summary["intensity-histogram"]) == 16
    for entry in metrics["rounds"]:  # no count, and no -1 marker, in any average
        assert not set(entry["global"]) & {"num-examples", "skipped-files", "train-examples"}
        for site, values in entry["sites"].items():
            shown = [values[k] for k in ("num-examples", "train-examples") if k in values]
            assert all(v == HIDDEN or v >= 5 for v in shown), (site, values)
    for received in ("metrics.json", "progress.log", "report.md"):  # what the coordinator holds
        text = (out / received).read_text()
        assert "case_0002" not in text, f"a file name reached {received}"
        assert str(data / "site-1") not in text, f"a site path reached {received}"
    report = (out / "report.md").read_text()
    assert "## Sites before training" in report
    assert "<5" not in report and "<5" not in (out / "progress.log").read_text()


def test_too_few_hospitals_fail_within_the_wait_and_name_the_count(tmp_path, seg_sites):
    out = tmp_path / "run"
    overrides = (
        f"min-nodes=3 node-wait-seconds=3.0 data-root='{seg_sites}' "
        f"out-dir='{out}' image-size=32 model-width=4 model-depth=2"
    )
    with simulation_superlink(tmp_path / "logs") as (env, _port):
        start = time.monotonic()
        flwr_run(overrides, sites=2, cpus_per_site=1, env=env, log_file=tmp_path / "run.log")
        waited = time.monotonic() - start
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert "only 2 of the required 3 hospitals connected" in metrics["error"]
    assert metrics["rounds"] == []
    assert waited < 90


@pytest.mark.slow
def test_plain_flwr_run_with_embedded_defaults_and_fedprox(tmp_path, monkeypatch):
    """`flwr run .` needs no data root: simulated nodes synthesise their own site."""
    monkeypatch.setenv("MEDFED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    overrides = (
        f"task='classification' strategy='fedprox' num-server-rounds=1 "
        f"out-dir='{out}' image-size=32 model-width=4 model-depth=2"
    )
    with simulation_superlink(tmp_path / "logs") as (env, _port):
        flwr_run(overrides, sites=2, cpus_per_site=1, env=env, log_file=tmp_path / "run.log")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    assert metrics["config"]["strategy"] == "fedprox"
    last = metrics["rounds"][-1]
    assert last["replied"] == ["site-0", "site-1"]
    assert {"auc", "accuracy", "recall-covid", "precision-normal"} <= set(last["global"])
    assert sorted(p.name for p in (tmp_path / "cache" / "synthetic").iterdir()) == [
        "classification-seed0"
    ]


@pytest.mark.slow
def test_fedbn_with_secure_aggregation_keeps_each_sites_norm_layers(tmp_path, cls_sites):
    """FedBN under SecAgg+: the run completes, the masked vector leaves the normalisation
    layers out, each hospital ends with statistics of its own on its disk, and the
    coordinator's model holds only initial values there."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--data", str(cls_sites),
         "--sites", "3", "--rounds", "2", "--out", str(out), *TINY_RUN, "-c",
         "task=classification", "-c", "strategy=fedbn", "-c", "norm=batch", "-c",
         "secure-aggregation=true", "-c", "federated-stats=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MEDFED_CACHE": str(cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(r["secure-aggregation"]["survivors"] == 3 for r in metrics["rounds"][1:])
    kept = sorted((cache / "sites").glob("*/fedbn/run-*.pt"))
    assert len(kept) == 3, kept
    layers = [torch.load(path, weights_only=True) for path in kept]
    means = [k for k in layers[0] if k.endswith("running_mean")]
    counters = [k for k in layers[0] if k.endswith("num_batches_tracked")]
    assert means and counters and all(int(lay[counters[0]]) > 0 for lay in layers)
    assert not torch.allclose(layers[0][means[0]], layers[1][means[0]])
    model = json.loads((out / "model.json").read_text())
    assert set(model["kept-at-hospitals"]) == set(layers[0])
    _, net = load_global_model(out)
    state = net.state_dict()
    assert all(torch.equal(state[k], torch.zeros_like(state[k])) for k in means)
