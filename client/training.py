"""What the hospital's ClientApp does: train and evaluate on local images.

Only model arrays and scalar metrics leave the site; the reply also names the
site (a label, not data) so the coordinator can report per-hospital results.
Names of skipped files stay in the node's own log; only their count is sent.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)
from torch import nn
from tqdm import tqdm

from medfed.client import secure_stage, telemetry
from medfed.client.data.loader import make_loader
from medfed.client.data.locate import resolve_site_path, site_cache_dir, site_name
from medfed.client.data.site import SiteData, load_site
from medfed.client.data.stats import site_statistics
from medfed.client.gan import generated_items
from medfed.shared_models.audit import audit
from medfed.shared_models.config import RunConfig
from medfed.shared_models.device import pick_device
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import exchanged_arrays, load_record


@contextmanager
def epoch_progress(site: str, server_round: int, batches: int):
    """A progress bar over local batches on an interactive node; silent in logs."""
    if not sys.stderr.isatty():
        yield None
        return
    with tqdm(total=batches, desc=f"{site} round {server_round}", unit="batch", leave=False) as bar:
        yield bar.update


class _Site:
    """The node's site for this run: config, validated data, cache and device."""

    def __init__(self, context: Context) -> None:
        self.cfg = RunConfig.from_mapping(context.run_config)
        node = context.node_config
        path = resolve_site_path(node, self.cfg)
        self.cache = site_cache_dir(node, path)
        self.site: SiteData = load_site(
            path, self.cfg, name=site_name(node, path), cache_dir=self.cache
        )
        for problem in self.site.problems[:10]:
            log(WARNING, "[medfed] %s: skipped %s", self.site.name, problem)
        if len(self.site.problems) > 10:
            log(
                WARNING,
                "[medfed] %s: %d more files skipped (run `medfed data check`)",
                self.site.name,
                len(self.site.problems) - 10,
            )
        self.device: torch.device = pick_device(str(node.get("device", self.cfg.device)))
        workers = node.get("loader-workers")
        simulated = "partition-id" in node  # simulated nodes share this machine's cores
        self.workers = int(workers) if workers is not None else (0 if simulated else None)
        self.task = TASKS[self.cfg.task]

    def loader(self, items: list, train: bool, server_round: int = 0, extra=None):
        return make_loader(
            self.site,
            items,
            self.cfg,
            train,
            self.device,
            self.cache,
            self.workers,
            server_round,
            extra,
        )


class _Setup(_Site):
    """A train or evaluate call: the site plus the network with the received weights."""

    def __init__(self, msg: Message, context: Context) -> None:
        super().__init__(context)
        self.net: nn.Module = self.task.build_network(self.cfg)
        load_record(self.net, msg.content.array_records["arrays"])


def _reply(
    msg: Message,
    site: SiteData,
    metrics: dict[str, float],
    arrays: ArrayRecord | None,
    secagg: ConfigRecord | None = None,
) -> Message:
    metrics["skipped-files"] = len(site.problems)
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    if secagg is not None:
        content["secagg"] = secagg
    return Message(content=content, reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights (plus FedProx's proximal term when asked)."""
    s = _Setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    extra = generated_items(s.site, s.cfg, server_round) if s.cfg.gan_augment_ratio else []
    loader = s.loader(s.site.train, train=True, server_round=server_round, extra=extra)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    start = time.perf_counter()
    with epoch_progress(s.site.name, server_round, len(loader) * s.cfg.local_epochs) as step:
        loss = s.task.train(s.net, loader, s.cfg, s.device, proximal_mu=mu, on_batch=step)
    seconds = time.perf_counter() - start
    images = len(s.site.train) * s.cfg.local_epochs
    metrics = {
        "train-loss": loss,
        "train-seconds": seconds,
        "images-per-second": images / seconds if seconds > 0 else 0.0,
        "num-examples": len(s.site.train),
        "generated-images": len(extra),
    }
    trained = exchanged_arrays(s.net.cpu())
    metrics["aggregation-weight"] = aggregation_weight(s)
    config = msg.content["config"]
    start_arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    if KEY_CLIPPING_NORM in config:
        norm_bit = clip_update(
            start_arrays, trained, float(config[KEY_CLIPPING_NORM]), s.cfg.dp_adaptive
        )
        if s.cfg.dp_adaptive:
            metrics[KEY_NORM_BIT] = int(norm_bit)
    arrays = ArrayRecord({key: Array(values) for key, values in trained.items()})
    next_keys = None
    if s.cfg.secure_aggregation:
        arrays, clipped, next_keys = secure_stage.masked_update(
            msg, context, start_arrays, trained, metrics["aggregation-weight"]
        )
        metrics["secagg-clipped-values"] = clipped
        if clipped:
            log(
                WARNING,
                "[medfed] %s: %d update values exceeded secagg-clipping-range and were clipped",
                s.site.name,
                clipped,
            )
    audit(
        "round-trained",
        run=context.run_id,
        round=server_round,
        site=s.site.name,
        examples=len(s.site.train),
        skipped_files=len(s.site.problems),
        sent_arrays={k: list(a.shape) for k, a in arrays.items()},
        masked=s.cfg.secure_aggregation,
        clipped_to_norm=float(config[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in config else None,
        sent_metrics=sorted([*metrics, "skipped-files"]),
    )
    telemetry.record_training(
        s.site.name,
        s.cfg.task,
        seconds,
        images,
        loss,
        len(s.site.train),
        len(s.site.problems),
        sum(len(a.data) for a in arrays.values()),
        server_round,
        str(s.device),
        torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else 0,
    )
    return _reply(msg, s.site, metrics, arrays, next_keys)


def aggregation_weight(s: _Site) -> float:
    """The example count; 1 under differential privacy, whose noise assumes equal weights."""
    return 1.0 if s.cfg.dp_mode != "off" else float(len(s.site.train))


def clip_update(
    start: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
    clipping_norm: float,
    adaptive: bool,
) -> bool:
    """Flower's DP clipping of (trained - global) to `clipping_norm`, before any masking.

    Flower's fixedclipping_mod/adaptiveclipping_mod do the same on the reply,
    but a mod runs after this handler, i.e. after masking; clipping must come
    first. `trained` is clipped in place; returns Flower's norm bit (clipped or not).
    """
    keys = list(start)
    values = [trained[k] for k in keys]
    origin = [start[k] for k in keys]
    if adaptive:
        norm_bit = compute_adaptive_clip_model_update(values, origin, clipping_norm)
    else:
        compute_clip_model_update(values, origin, clipping_norm)
        norm_bit = False
    for key, clipped in zip(keys, values, strict=True):
        trained[key] = clipped.astype(start[key].dtype, copy=False)
    return norm_bit


def advertise(msg: Message, context: Context) -> Message:
    """SecAgg+ step 1: this round's public keys and the site's aggregation weight."""
    return secure_stage.advertise(msg, context, aggregation_weight(_Site(context)))


def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received global model on this site's held-out split."""
    s = _Setup(msg, context)
    metrics = s.task.evaluate(s.net, s.loader(s.site.val, train=False), s.cfg, s.device)
    metrics["num-examples"] = len(s.site.val)
    metrics["aggregation-weight"] = len(s.site.val)
    telemetry.record_evaluation(s.site.name, s.cfg.task, metrics)
    audit(
        "round-evaluated",
        run=context.run_id,
        site=s.site.name,
        round=int(msg.content["config"].get("server-round", 0)),
        sent_metrics=sorted([*metrics, "skipped-files"]),
    )
    return _reply(msg, s.site, metrics, None)


def query(msg: Message, context: Context) -> Message:
    """This site's summary for the coordinator, with small counts suppressed here."""
    s = _Site(context)
    min_count = int(msg.content["config"]["stats-min-count"])
    stats = site_statistics(s.site, s.cfg, min_count, cache_dir=s.cache)
    audit(
        "run-joined",
        run=context.run_id,
        site=s.site.name,
        task=s.cfg.task,
        sent_statistics=sorted(stats),
        min_count=min_count,
    )
    content = RecordDict(
        {"metrics": MetricRecord(stats), "site": ConfigRecord({"name": s.site.name})}
    )
    return Message(content=content, reply_to=msg)
