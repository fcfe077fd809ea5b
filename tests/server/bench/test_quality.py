"""The quality bench's baselines with the hospital's real training path: pooled and local
runs score every site, give the same budget as the federation, and a second call reuses
what the first finished instead of training again."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medfed.client.data.site_paths import site_folders
from medfed.client.local_training import train_and_evaluate
from medfed.client.synthetic import generate_federation
from medfed.server.bench.quality import Hospitals, QualityBench, _base, _config, run_bench
from medfed.server.simulation.simulate import Simulation, prepare
from medfed.shared_models.config import ConfigError
from tests.conftest import redeclared_sites

TINY = {"image-size": 32, "model-width": 4, "model-depth": 2, "batch-size": 8, "local-epochs": 1}


def _bench(tmp_path, data, **given) -> QualityBench:
    values = {"task": "classification", "out": tmp_path / "bench", "data": data, "rounds": 2,
              "seeds": 2, "methods": ("pooled", "local"), "overrides": TINY, **given}  # fmt: skip
    return QualityBench(**values)


def test_pooled_and_local_baselines_fill_the_table_and_are_reused(cls_sites, tmp_path):
    calls = []

    def counted(train_on, evaluate_on, cfg, epochs):
        calls.append((len(train_on), epochs, cfg.norm))
        return train_and_evaluate(train_on, evaluate_on, cfg, epochs)

    hospitals = Hospitals(generate_federation, site_folders, counted)
    assert run_bench(_bench(tmp_path, cls_sites), hospitals) == 0
    # pooled once and each of the 3 sites alone, per seed; rounds x local epochs each
    assert sorted(calls) == sorted([(3, 2, "batch")] * 2 + [(1, 2, "batch")] * 6)
    data = json.loads((tmp_path / "bench" / "quality.json").read_text())
    local = data["runs"]["local"]["0"]
    assert set(local["cross"]) == {"site-0", "site-1", "site-2"}
    assert all(set(row) == {"site-0", "site-1", "site-2"} for row in local["cross"].values())
    assert all(r["average"]["n"] == 2 for r in data["table"])

    calls.clear()
    assert run_bench(_bench(tmp_path, cls_sites), hospitals) == 0
    assert calls == []  # every run's result was on disk


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"task": "gan"}, "--task gan"),
        ({"task": None, "data": None}, "--task: needed without --data"),
        ({"methods": ("pooled", "fedsgd")}, "--methods fedsgd"),
        ({"sites": 1}, "--sites 1"),
        ({"sites": 2, "methods": ("fedavg-secure",)}, "fedavg-secure needs at least 3"),
        ({"sites": 5}, "3 site folders, --sites 5"),
        ({"overrides": {"strategy": "krum"}}, "-c strategy: set by the bench itself"),
    ],
)
def test_bad_requests_are_refused_naming_the_option(cls_sites, tmp_path, given, named):
    hospitals = Hospitals(generate_federation, site_folders, train_and_evaluate)
    with pytest.raises(ConfigError, match=named):
        run_bench(_bench(tmp_path, **{"data": cls_sites, **given}), hospitals)


def test_a_method_takes_its_own_settings_unless_the_command_line_sets_them(cls_sites, tmp_path):
    bench = _bench(tmp_path, cls_sites)
    folders = site_folders(cls_sites)
    base = _base(bench, folders)
    fedadam = _config(bench, base, cls_sites, 1, "fedadam")
    assert (fedadam.strategy, fedadam.server_lr, fedadam.seed) == ("fedadam", 0.01, 1)
    secure = _config(bench, base, cls_sites, 0, "fedavg-secure")
    assert secure.secure_aggregation and secure.strategy == "fedavg"
    tuned = _bench(tmp_path, cls_sites, overrides={**TINY, "server-lr": 0.001})
    assert _config(tuned, _base(tuned, folders), cls_sites, 0, "fedadam").server_lr == 0.001


OTHER = {"0": "clear", "1": "viral", "2": "bacterial"}  # not the task's default classes


def test_without_task_the_bench_takes_the_sites_task_and_classes(cls_sites, tmp_path, capsys):
    data = redeclared_sites(cls_sites, tmp_path / "data", [{"labels": OTHER}] * 3)
    seen = []

    def recorded(train_on, evaluate_on, cfg, epochs):
        seen.append((cfg.task, cfg.classes))
        return train_and_evaluate(train_on, evaluate_on, cfg, epochs)

    bench = _bench(tmp_path, data, task=None, rounds=1, seeds=1, methods=("pooled",))
    assert run_bench(bench, Hospitals(generate_federation, site_folders, recorded)) == 0
    assert seen == [("classification", ("clear", "viral", "bacterial"))]
    out = json.loads((tmp_path / "bench" / "quality.json").read_text())
    assert (out["task"], out["classes"]) == ("classification", ["clear", "viral", "bacterial"])
    assert out["config"]["class-names"] == "clear,viral,bacterial"
    printed = capsys.readouterr().out
    assert "task from the sites' dataset.json: classification\n" in printed
    assert "classes from the sites' dataset.json: clear, viral, bacterial\n" in printed


def test_a_federated_method_runs_on_sites_with_other_labels(cls_sites, tmp_path):
    """What `_federated` hands `medfed simulate` passes its checks of every site."""
    data = redeclared_sites(cls_sites, tmp_path / "data", [{"labels": OTHER}] * 3)
    bench = _bench(tmp_path, data, methods=("fedavg",))  # --task classification, as given
    folders = site_folders(data)
    cfg = _config(bench, _base(bench, folders), data, 0, "fedavg")
    sim = Simulation(overrides=cfg.to_mapping(), sites=3, out=tmp_path / "run", data=data)
    checked, _ = prepare(sim)
    assert checked.classes == ("clear", "viral", "bacterial")


def test_sites_that_name_no_task_need_one(cls_sites, tmp_path):
    hospitals = Hospitals(generate_federation, site_folders, train_and_evaluate)
    data = redeclared_sites(cls_sites, tmp_path / "data", [{"task": None}] * 3)
    with pytest.raises(ConfigError, match=r"--task: the sites' dataset.json under .* name none"):
        run_bench(_bench(tmp_path, data, task=None), hospitals)


def test_synthetic_hospitals_show_every_sites_metric_real_ones_keep_their_floor(
    cls_sites, tmp_path
):
    """Issue 25: on the default synthetic hospitals a site below the floor hid its metrics,
    and the per-site table had nothing to compare for it."""
    folders = site_folders(cls_sites)
    synthetic = replace(_bench(tmp_path, cls_sites), data=None, task="classification")
    assert _base(synthetic, folders)["stats-min-count"] == 1
    assert "stats-min-count" not in _base(_bench(tmp_path, cls_sites), folders)
    floor = replace(synthetic, overrides={"stats-min-count": 7})
    assert _base(floor, folders)["stats-min-count"] == 7, "-c wins"
