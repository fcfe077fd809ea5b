"""Run folders for the tests that use a finished model (predict, export), without a federation.

A run folder is what `medfed predict` and `medfed export` read: model.json (the
config) and global_model.pt. Training one network locally on a synthetic site
stands in for a federated run: the files are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medfed.client.data.loader import make_loader
from medfed.client.data.site import load_site
from medfed.client.synthetic import generate_federation
from medfed.server.run.run_record import RunRecord
from medfed.shared_models.config import RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.run_folder import GLOBAL_MODEL, MODEL_JSON, RUN_BUNDLE
from medfed.shared_models.tasks import TASKS


def write_run(out: Path, cfg: RunConfig, net: torch.nn.Module) -> Path:
    """A finished run folder holding `net` (the files `RunRecord.save_model` writes)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / GLOBAL_MODEL)
    meta = {"task": cfg.task, "model": cfg.model, "classes": list(cfg.classes)}
    (out / MODEL_JSON).write_text(json.dumps({**meta, "config": cfg.to_mapping()}))
    return out


def untrained_run(out: Path, **config: object) -> tuple[RunConfig, Path]:
    """A run folder with a freshly initialised network (for properties that hold for any
    weights: file formats, geometry, probabilities)."""
    cfg = RunConfig.from_mapping(config)
    torch.manual_seed(0)
    return cfg, write_run(out, cfg, TASKS[cfg.task].build_network(cfg))


def trained_run(root: Path, task: str, epochs: int, images: int, **config: object) -> Path:
    """A run folder with a network trained on one synthetic site, which is at root/data."""
    site_path = generate_federation(task, 1, root / "data", seed=0, images_per_site=images,
                                    image_size=config.get("image-size", 32))[0]  # fmt: skip
    cfg = RunConfig.from_mapping({"task": task, "lr": 0.01, "local-epochs": epochs, **config})
    site = load_site(site_path, cfg)
    torch.manual_seed(0)
    net = TASKS[task].build_network(cfg)
    cpu = torch.device("cpu")
    TASKS[task].train(net, make_loader(site, site.train, cfg, train=True, device=cpu), cfg, cpu)
    return write_run(root / "run", cfg, net)


def bundle_run(out: Path, bundle: Path, net: torch.nn.Module) -> Path:
    """A finished task = bundle run of `bundle` holding `net`, written as the coordinator
    writes one (server/run/federated_run.py `_request`, RunRecord): the bundle's hashed files
    copied into the folder, its identity in metrics.json and model.json. Reading the
    bundle here runs none of it (`net` is built by the caller, from a harmless twin)."""
    cfg = RunConfig.from_mapping({"task": "bundle", "bundle": str(bundle)})
    record = RunRecord(cfg, out)
    source = Bundle(bundle)
    source.copy_hashed(out / RUN_BUNDLE)
    record.set_bundle(source.identity())
    record.save_model(net, cfg, 1)
    record.finish("completed")
    return out
