"""A bundle's own trainer and evaluator at one site, through MONAI's MonaiAlgo: they read the
site's datalist (the bundle's own data paths are never used), the weights go in checked,
and the metrics come back under medfed's keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfed.client.bundle_data import bundle_datalist
from medfed.client.bundle_engines import BundleSite, evaluate_round, reported_metrics, train_round
from medfed.client.round_request import MalformedRequest
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.protocol import Metric
from medfed.shared_models.weights import to_record
from tests.bundles import write_bundle
from tests.conftest import tiny_config

CPU = torch.device("cpu")
BATCH = 2  # the test bundle's batch size


def _site(seg_sites, bundle_root) -> BundleSite:
    bundle = Bundle(bundle_root)
    data = bundle_datalist(seg_sites / "site-0", tiny_config())
    return BundleSite(bundle, "site-0", data, CPU)


@pytest.fixture(scope="module")
def site(seg_sites, tmp_path_factory) -> BundleSite:
    return _site(seg_sites, write_bundle(tmp_path_factory.mktemp("bundle")))


def _initial(site: BundleSite):
    torch.manual_seed(0)
    return to_record(site.bundle.network())


def test_training_runs_the_bundle_on_the_sites_datalist(site):
    # the bundle's own data list globs a folder no site has: had the site's datalist not
    # replaced it, the trainer would have had nothing to iterate over
    sent = _initial(site)
    trained = train_round(site, sent, epochs=2, proximal_mu=0.0)
    assert trained.iterations == 2 * math.ceil(len(site.data.train) / BATCH)
    assert math.isfinite(trained.loss) and trained.loss > 0
    assert list(trained.arrays) == list(sent)
    moved = [not np.allclose(trained.arrays[k].numpy(), sent[k].numpy()) for k in sent]
    assert all(moved[:2])  # the first convolution's weights and bias were trained


def test_the_proximal_term_keeps_the_update_near_the_global_model(site):
    sent = _initial(site)

    def distance(mu: float) -> float:
        arrays = train_round(site, sent, epochs=1, proximal_mu=mu).arrays
        return sum(float(np.sum((arrays[k].numpy() - sent[k].numpy()) ** 2)) for k in sent)

    assert distance(1000.0) < distance(0.0)


def test_evaluation_reports_the_evaluators_key_metric_and_the_loss(site):
    metrics = evaluate_round(site, _initial(site))
    assert set(metrics) == {"val-mean-dice", Metric.KEY_METRIC, Metric.LOSS}
    assert metrics[Metric.KEY_METRIC] == metrics["val-mean-dice"]
    assert 0.0 <= metrics[Metric.KEY_METRIC] <= 1.0 and metrics[Metric.LOSS] > 0


def test_without_an_evaluator_the_key_metric_is_the_validation_loss(seg_sites, tmp_path):
    plain = _site(seg_sites, write_bundle(tmp_path, evaluator=False))
    metrics = evaluate_round(plain, _initial(plain))
    assert set(metrics) == {Metric.KEY_METRIC, Metric.LOSS}
    assert metrics[Metric.KEY_METRIC] == metrics[Metric.LOSS] > 0


def test_weights_that_do_not_fit_the_bundles_network_are_refused(site):
    sent = _initial(site)
    first = next(iter(sent))
    del sent[first]
    with pytest.raises(MalformedRequest, match=f"missing arrays \\['{first}'\\]"):
        train_round(site, sent, epochs=1, proximal_mu=0.0)


def test_bundle_metric_names_become_medfed_keys():
    reported = reported_metrics(
        {"val_mean_dice": torch.tensor(0.5), "Loss": 1.0, "per_class": torch.ones(3), "ok": True}
    )
    assert reported == {"val-mean-dice": 0.5, "bundle-loss": 1.0}
