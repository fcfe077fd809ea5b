"""A bundle's trainer and evaluator at one hospital, driven by MONAI's `MonaiAlgo`.

`MonaiAlgo` (monai.fl.client) is MONAI's own federated client for bundles: it
builds the bundle's `ConfigWorkflow`s with our overrides, loads the global
weights into the trainer's network, runs `local-epochs` epochs and hands the
weights back; for evaluation it runs the bundle's validation evaluator on
them. What it leaves to the federated system, medfed adds here by hand, as
ignite event handlers on the bundle's own engines: the training loss of the
round, the validation loss with the bundle's own loss function, FedProx's
proximal term, and (for a bundle without an evaluator) an evaluator over the
bundle's training pipeline whose key metric is that loss.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems
from monai.fl.utils.exchange_object import ExchangeObject
from monai.handlers import from_engine
from monai.utils import CommonKeys
from torch import nn

from medfed.client.bundle_data import BundleData
from medfed.client.round_request import MalformedRequest
from medfed.shared_models.monai_bundle import LOSS, MAX_EPOCHS, Bundle
from medfed.shared_models.protocol import Metric
from medfed.shared_models.weights import (
    exchanged_keys,
    incompatibilities,
    net_template,
    record_from_state_dict,
    state_dict_from_record,
)

# Keys medfed itself puts in a reply: a bundle metric of the same name is reported prefixed.
RESERVED = {v for k, v in vars(Metric).items() if k.isupper() and isinstance(v, str)}


@dataclass(frozen=True)
class Trained:
    """One round of a bundle's local training: the arrays to send and the mean loss."""

    arrays: ArrayRecord
    loss: float
    iterations: int


class LossMeter:
    """The mean of a loss over an engine's iterations (or over images, when weighted)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: torch.Tensor | float, weight: int = 1) -> None:
        self.total += float(value) * weight
        self.count += weight

    @property
    def mean(self) -> float:
        if self.count == 0:
            raise RuntimeError(
                "the bundle's engine ran no iteration: is the site's datalist empty?"
            )
        return self.total / self.count


@dataclass(frozen=True)
class BundleSite:
    """Where a bundle runs: the bundle, this site's label, datalist and device."""

    bundle: Bundle
    name: str
    data: BundleData
    device: torch.device

    def overrides(self, evaluation: bool, train: list[dict[str, Any]] | None = None) -> dict:
        """The bundle's data and device pointed at this site (`train`: another training list)."""
        data = self.data
        train = data.train if train is None else train
        return self.bundle.site_overrides(data.root, train, data.val, str(self.device), evaluation)


def train_round(site: BundleSite, record: ArrayRecord, epochs: int, proximal_mu: float) -> Trained:
    """`epochs` epochs of the bundle's own trainer from the received global weights."""
    bundle = site.bundle
    algo = MonaiAlgo(
        bundle_root=str(bundle.root),
        local_epochs=epochs,
        send_weight_diff=False,
        config_train_filename=bundle.train_file.relative_to(bundle.root).as_posix(),
        train_kwargs={**site.overrides(evaluation=False), MAX_EPOCHS: epochs},
        config_evaluate_filename=None,
    )
    algo.initialize({ExtraItems.CLIENT_NAME: site.name})
    try:
        trainer = algo.trainer
        assert trainer is not None  # MonaiAlgo refuses a bundle without a SupervisedTrainer
        network = trainer.network
        state = checked_weights(network, record)
        losses = LossMeter()
        loss_of = from_engine([CommonKeys.LOSS], first=True)  # decollated output or not
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda engine: losses.add(loss_of(engine.state.output)),
        )
        if proximal_mu > 0:
            add_proximal_term(trainer, proximal_mu)
        algo.train(ExchangeObject(weights=state))
        weights = algo.get_weights().weights
        keys = exchanged_keys(network)
        return Trained(
            record_from_state_dict({k: weights[k] for k in keys}), losses.mean, losses.count
        )
    finally:
        algo.finalize()


def checked_weights(network: nn.Module, record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """The received arrays as a state dict, after checking that they fit the bundle's
    network name for name (MonaiAlgo alone would skip a missing or extra name)."""
    problems = incompatibilities(record, net_template(network))
    if problems:
        raise MalformedRequest(
            "received weights do not fit the bundle's network: " + "; ".join(problems[:5])
        )
    return state_dict_from_record(record)


def add_proximal_term(trainer: SupervisedTrainer, mu: float) -> None:
    """FedProx at a bundle's trainer: mu/2 * ||w - w_global||^2 added to its loss, anchored
    at the weights the trainer starts the round from (the global model MonaiAlgo loaded)."""
    anchor: list[torch.Tensor] = []
    inner: Callable[..., torch.Tensor] = trainer.loss_function

    def snapshot(engine: Engine) -> None:
        anchor[:] = [p.detach().clone() for p in trainer.network.parameters()]

    def proximal_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        drift = sum(
            (p - a).pow(2).sum() for p, a in zip(trainer.network.parameters(), anchor, strict=True)
        )
        return inner(*args, **kwargs) + mu / 2 * drift

    trainer.add_event_handler(Events.STARTED, snapshot)
    trainer.loss_function = proximal_loss


def attach_validation_loss(evaluator: SupervisedEvaluator, loss_fn: Callable) -> LossMeter:
    """The bundle's training loss on the evaluator's raw predictions (before its
    post-processing), averaged over the validation images."""
    losses = LossMeter()

    def measure(engine: Engine) -> None:
        output = engine.state.output
        pred, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        losses.add(loss_fn(pred.float(), label).mean(), weight=int(pred.shape[0]))

    evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, measure)
    return losses


def evaluate_round(site: BundleSite, record: ArrayRecord) -> dict[str, float]:
    """The received weights scored on the site's validation entries: the bundle's evaluator
    and its key metric when it has one, else the loss over its training pipeline."""
    if not site.bundle.has_evaluator:
        return _evaluate_loss_only(site, record)
    algo = MonaiAlgo(
        bundle_root=str(site.bundle.root),
        config_train_filename=None,
        config_evaluate_filename=list(site.bundle.eval_files),
        eval_kwargs=site.overrides(evaluation=True),
        eval_workflow_name="train",
    )
    algo.initialize({ExtraItems.CLIENT_NAME: site.name})
    try:
        evaluator = algo.evaluator
        assert evaluator is not None and algo.eval_workflow is not None
        state = checked_weights(evaluator.network, record)
        loss_fn = algo.eval_workflow.parser.get_parsed_content(LOSS)
        losses = attach_validation_loss(evaluator, loss_fn)
        result = algo.evaluate(ExchangeObject(weights=state))
        metrics = reported_metrics(result.metrics or {})
        key = evaluator.state.key_metric_name
        value = _scalar(evaluator.state.metrics.get(key))
        if value is None:
            raise RuntimeError(f"the bundle's evaluator gave no number for its key metric {key!r}")
        metrics[Metric.KEY_METRIC] = value
        metrics[Metric.LOSS] = losses.mean
        return metrics
    finally:
        algo.finalize()


def _evaluate_loss_only(site: BundleSite, record: ArrayRecord) -> dict[str, float]:
    """No evaluator in the bundle: a SupervisedEvaluator over the bundle's own training
    pipeline (preprocessing, inferer, batch layout) fed the validation entries, scoring
    the bundle's training loss. Its random augmentations, if any, stay on."""
    workflow = ConfigWorkflow(
        config_file=str(site.bundle.train_file),
        logging_file=False,
        workflow_type="train",
        **site.overrides(evaluation=False, train=site.data.val),
    )
    workflow.initialize()
    trainer = workflow.trainer
    evaluator = SupervisedEvaluator(
        device=trainer.state.device,
        val_data_loader=trainer.data_loader,
        network=trainer.network,
        inferer=trainer.inferer,
        prepare_batch=trainer.prepare_batch,
    )
    trainer.network.load_state_dict(checked_weights(trainer.network, record), strict=False)
    losses = attach_validation_loss(evaluator, trainer.loss_function)
    evaluator.run()
    workflow.finalize()
    return {Metric.KEY_METRIC: losses.mean, Metric.LOSS: losses.mean}


def reported_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The evaluator's scalar metrics under medfed's lower-case, dash-separated keys
    (`val_mean_dice` -> `val-mean-dice`); one named like a key of medfed's own is
    prefixed `bundle-`."""
    reported = {}
    for name, value in metrics.items():
        number = _scalar(value)
        if number is None:
            continue
        key = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "metric"
        reported[f"bundle-{key}" if key in RESERVED else key] = number
    return reported


def _scalar(value: Any) -> float | None:
    """A number, or a one-element tensor, as a float; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return None
