"""What a hospital does with each message: train, evaluate, summarise its site.

Every handler opens the node's site for the run (`NodeSite`): a deployed
SuperNode runs each message in a fresh ClientApp process, so the site is
opened (its scan read from the cache) per message. Only model arrays and
scalar metrics leave the site; the reply also names the site (a label, not
data) so the coordinator can report per hospital. Names of skipped files stay
in this node's log. What happens to a reply on its way out (DP clipping,
SecAgg+ masking, the site's decision on its counts, the audit line) is done by the mods
in `client/privacy/`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log
from monai.data import DataLoader
from torch import nn
from tqdm import tqdm

from medfed.client import local_layers, node_metrics, node_models
from medfed.client.data.loader import make_loader
from medfed.client.data.site import SiteDataset, load_site
from medfed.client.data.site_paths import resolve_site_path, site_cache_dir, site_name
from medfed.client.data.site_statistics import site_summary
from medfed.client.gan_samples import generated_items
from medfed.client.privacy.disclosure import SiteCounts, decide, largest_hidden_train, remember
from medfed.client.privacy.filters import site_floor
from medfed.client.round_request import MalformedRequest, cross_site_model, round_settings
from medfed.client.settings import node_settings, run_config
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Metric, Record, SiteKey, Statistic
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import load_record, to_record

SHOWN_PROBLEMS = 10


def pick_device(requested: str = "auto") -> torch.device:
    """Where this hospital trains: `auto` is its GPU when it has one, else the CPU.

    `cuda` or `cuda:N` on a node without CUDA is an error, not a silent CPU run.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available here")
    return device


class NodeSite:
    """The run's config, this site's usable data, its cache folder, device and task."""

    def __init__(self, context: Context) -> None:
        self.cfg = node_models.resolve(run_config(context))
        self.context = context
        node = node_settings(context)
        self.floor = site_floor(context)  # the floor every reply of the run obeys
        path = resolve_site_path(node, self.cfg)
        self.cache = site_cache_dir(node, path)
        self.data: SiteDataset = load_site(
            path, self.cfg, name=site_name(node, path), cache_dir=self.cache
        )
        self._log_skipped()
        self.device: torch.device = pick_device(node.device or self.cfg.device)
        simulated = node.partition is not None  # simulated nodes share this machine's cores
        self.workers = node.loader_workers
        if self.workers is None and simulated:
            self.workers = 0
        self.task = TASKS[self.cfg.task]

    @property
    def name(self) -> str:
        """The site's label in reports and metrics (never a patient or file name)."""
        return self.data.name

    def _log_skipped(self) -> None:
        for problem in self.data.problems[:SHOWN_PROBLEMS]:
            log(WARNING, "[medfed] %s: skipped %s", self.name, problem)
        if len(self.data.problems) > SHOWN_PROBLEMS:
            log(
                WARNING,
                "[medfed] %s: %d more files skipped (run `medfed data check`)",
                self.name,
                len(self.data.problems) - SHOWN_PROBLEMS,
            )

    def counts(self, histogram: list[int] | None = None) -> SiteCounts:
        """The site's exact counts, for the filters' one decision on what replies show."""
        return SiteCounts(
            train=len(self.data.train),
            val=len(self.data.val),
            histogram=tuple(histogram or ()),
            presence=self.task.label_kind == "mask",
        )

    def hidden_epoch(self) -> int | None:
        """Training items per epoch of a site whose counts are hidden (None when shown): the
        most a hidden site can have, drawn with replacement, so that the update carries no
        trace of the site's own count (client/privacy/disclosure.largest_hidden_train)."""
        if decide(self.counts(), self.floor).split_shown:
            return None
        return largest_hidden_train(self.floor, self.cfg.val_fraction)

    def aggregation_weight(self) -> float:
        """The example count; 1 under differential privacy, whose noise assumes equal weights."""
        return 1.0 if self.cfg.dp_mode != "off" else float(len(self.data.train))

    def network(self, msg: Message) -> nn.Module:
        """The run's network holding the weights the message carries (under FedBN with
        this site's own normalisation layers)."""
        arrays = msg.content.array_records.get(Record.ARRAYS)
        if arrays is None:
            raise MalformedRequest(f"the message has no '{Record.ARRAYS}' record")
        net = self.task.build_network(self.cfg)
        try:
            load_record(net, arrays, self.cfg.keeps_norms_local)
        except ValueError as err:  # names and shapes the coordinator sent: no site data
            raise MalformedRequest(str(err)) from None
        if self.cfg.keeps_norms_local:
            local_layers.restore(net, self.context, self.cache)
        return net

    def loader(
        self,
        items: list[dict[str, Any]],
        *,
        train: bool,
        server_round: int = 0,
        extra: list[dict[str, Any]] | None = None,
        epoch_images: int | None = None,
    ) -> DataLoader:
        """Batches of `items`, seeded by (seed, round), cached under this node's cache."""
        return make_loader(
            self.data,
            items,
            self.cfg,
            train=train,
            device=self.device,
            cache_dir=self.cache,
            workers=self.workers,
            server_round=server_round,
            extra=extra,
            epoch_images=epoch_images,
        )

    def reply(
        self, msg: Message, metrics: dict[str, Any], arrays: ArrayRecord | None = None
    ) -> Message:
        """The reply: metrics, the site's label (never data) and, after training, the arrays."""
        return site_reply(msg, self.name, metrics, arrays)


def site_reply(
    msg: Message, site: str, metrics: dict[str, Any], arrays: ArrayRecord | None = None
) -> Message:
    """A reply: metrics, the site's label (never data) and, after training, the arrays."""
    content = RecordDict(
        {
            Record.METRICS: MetricRecord(metrics),
            Record.SITE: ConfigRecord({SiteKey.NAME: site}),
        }
    )
    if arrays is not None:
        content[Record.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


class TrainingClock:
    """Times local training and tracks the peak GPU memory from its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.started = time.perf_counter()

    def stop(
        self, site: str, cfg: RunConfig, server_round: int, examples: int, loss: float
    ) -> node_metrics.TrainingReport:
        """The report of the training that ran since this clock started."""
        cuda = self.device.type == "cuda"
        return node_metrics.TrainingReport(
            site=site,
            task=cfg.task,
            server_round=server_round,
            seconds=time.perf_counter() - self.started,
            images=examples * cfg.local_epochs,
            loss=loss,
            examples=examples,
            device=str(self.device),
            gpu_peak_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else 0,
        )


@contextmanager
def batch_progress(site: str, server_round: int, batches: int) -> Iterator[Callable | None]:
    """A progress bar over local batches on an interactive node; silent in logs."""
    if not sys.stderr.isatty():
        yield None
        return
    with tqdm(total=batches, desc=f"{site} round {server_round}", unit="batch", leave=False) as bar:
        yield bar.update


def train(msg: Message, context: Context) -> Message:
    """Local epochs from the received global weights (FedProx's proximal term when asked),
    the received model validated first unless the run evaluates in messages of their own."""
    request = round_settings(msg)
    server_round = request.server_round
    site = NodeSite(context)
    net = site.network(msg)
    folded = site.cfg.validates_in_training(server_round)
    validation = validate(site, net) if folded else None
    extra = generated_items(site.data, site.cfg, server_round) if site.cfg.gan_augment_ratio else []
    loader = site.loader(
        site.data.train,
        train=True,
        server_round=server_round,
        extra=extra,
        epoch_images=site.hidden_epoch(),
    )
    mu = request.proximal_mu
    clock = TrainingClock(site.device)
    with batch_progress(site.name, server_round, len(loader) * site.cfg.local_epochs) as step:
        loss = site.task.train(net, loader, site.cfg, site.device, proximal_mu=mu, on_batch=step)
    report = clock.stop(site.name, site.cfg, server_round, len(site.data.train), loss)
    node_metrics.record_training(report)
    metrics = {
        Metric.TRAIN_LOSS: loss,
        Metric.TRAIN_SECONDS: report.seconds,
        Metric.IMAGES_PER_SECOND: report.images_per_second,
        Metric.NUM_EXAMPLES: len(site.data.train),
        Metric.GENERATED_IMAGES: len(extra),
        Metric.WEIGHT: site.aggregation_weight(),
        Metric.SKIPPED_FILES: len(site.data.problems),
    }
    local = site.cfg.keeps_norms_local
    if local:
        local_layers.keep(net, context, site.cache)
    remember(context, site.counts())
    reply = site.reply(msg, metrics, to_record(net.cpu(), local))
    if validation is not None:
        reply.content[Record.VALIDATION] = MetricRecord(validation)
    return reply


def validate(site: NodeSite, net: nn.Module) -> dict[str, Any]:
    """A model's metrics on this site's held-out split, as an evaluation reply has them."""
    metrics = site.task.evaluate(
        net, site.loader(site.data.val, train=False), site.cfg, site.device
    )
    metrics[Metric.NUM_EXAMPLES] = len(site.data.val)
    metrics[Metric.WEIGHT] = len(site.data.val)
    metrics[Metric.SKIPPED_FILES] = len(site.data.problems)
    return metrics


def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received model on this site's held-out split: the global
    model, or at the end of a run another site's last local model (cross-site evaluation)."""
    round_settings(msg)  # a malformed request is refused before the site is opened
    cross_site_model(msg)  # refused here when malformed (the audit line names the model)
    site = NodeSite(context)
    metrics = validate(site, site.network(msg))
    remember(context, site.counts())
    return site.reply(msg, metrics)


def query(msg: Message, context: Context) -> Message:
    """This site's summary; `small_count_mod` hides its counts on the way out as the site's
    one decision says."""
    site = NodeSite(context)
    summary = site_summary(site.data, site.cfg, cache_dir=site.cache)
    remember(context, site.counts(summary[Statistic.LABEL_HISTOGRAM]))
    return site.reply(msg, summary)
