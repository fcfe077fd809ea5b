"""The quality bench's baselines with the hospital's real training path: pooled and local
runs score every site, give the same budget as the federation, and a second call reuses
what the first finished instead of training again."""

from __future__ import annotations

import json

import pytest

from medfed.client.data.locate import site_folders
from medfed.client.local_training import train_and_evaluate
from medfed.client.synthetic import generate_federation
from medfed.server.quality_bench import Hospitals, QualityBench, run_bench
from medfed.shared_models.config import ConfigError

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
        run_bench(_bench(tmp_path, cls_sites, **given), hospitals)


def test_a_method_takes_its_own_settings_unless_the_command_line_sets_them(cls_sites, tmp_path):
    from medfed.server.quality_bench import _config

    bench = _bench(tmp_path, cls_sites)
    fedadam = _config(bench, cls_sites, 1, "fedadam")
    assert (fedadam.strategy, fedadam.server_lr, fedadam.seed) == ("fedadam", 0.01, 1)
    secure = _config(bench, cls_sites, 0, "fedavg-secure")
    assert secure.secure_aggregation and secure.strategy == "fedavg"
    tuned = _bench(tmp_path, cls_sites, overrides={**TINY, "server-lr": 0.001})
    assert _config(tuned, cls_sites, 0, "fedadam").server_lr == 0.001
