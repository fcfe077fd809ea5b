"""The hospital side: a Flower ClientApp that trains and evaluates on local images.

Only model arrays and scalar metrics leave the site; the reply also names the
site (a label, not data) so the coordinator can report per-hospital results.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfed.client.loader import make_loader
from medfed.client.site import resolve_site_path, site_name
from medfed.client.site_data import SiteData, load_site
from medfed.shared_models.config import RunConfig
from medfed.shared_models.device import pick_device
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import load_record, to_record

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, SiteData, object, object]:
    cfg = RunConfig.from_mapping(context.run_config)
    path = resolve_site_path(context.node_config, cfg)
    site = load_site(path, cfg, name=site_name(context.node_config, path))
    device = pick_device(str(context.node_config.get("device", cfg.device)))
    task = TASKS[cfg.task]
    net = task.build_network(cfg)
    load_record(net, msg.content.array_records["arrays"])
    return cfg, site, device, net


def _reply(
    msg: Message, site: SiteData, metrics: dict[str, float], arrays: ArrayRecord | None
) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights (plus FedProx's proximal term when asked)."""
    cfg, site, device, net = _setup(msg, context)
    task = TASKS[cfg.task]
    loader = make_loader(site.train, cfg, train=True, device=device)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    start = time.perf_counter()
    loss = task.train(net, loader, cfg, device, proximal_mu=mu)
    seconds = time.perf_counter() - start
    images = len(site.train) * cfg.local_epochs
    metrics = {
        "train-loss": loss,
        "train-seconds": seconds,
        "images-per-second": images / seconds if seconds > 0 else 0.0,
        "num-examples": len(site.train),
    }
    return _reply(msg, site, metrics, to_record(net.cpu()))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received global model on this site's held-out split."""
    cfg, site, device, net = _setup(msg, context)
    loader = make_loader(site.val, cfg, train=False, device=device)
    metrics = TASKS[cfg.task].evaluate(net, loader, cfg, device)
    metrics["num-examples"] = len(site.val)
    return _reply(msg, site, metrics, None)
