"""A run's network as TorchScript: loadable from C++ (libtorch) or Python without medfed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medfed.client.data.transforms import preprocessing_spec
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS

MODEL_TS = "model.ts"


def write_torchscript(
    cfg: RunConfig, net: nn.Module, modality: str, out: Path, caveat: str | None
) -> Path:
    """out/model.ts: the traced network, with the run config and the preprocessing it
    expects stored inside the file (extra file `medfed.json`), and `caveat` (what a user
    of a FedBN global model must know) when there is one."""
    task = TASKS[cfg.task]
    task.network_spec(cfg)  # a task without a describable network (gan) is refused here
    example = torch.zeros(1, cfg.in_channels, *([cfg.image_size] * task.spatial_dims))
    with torch.no_grad():
        traced = torch.jit.trace(net.eval(), example)
    described = {
        "config": cfg.to_mapping(),
        "input": {"shape": list(example.shape), "dtype": "float32"},
        "preprocessing": preprocessing_spec(cfg, modality, ["image"]),
    }
    if caveat:
        described["warning"] = caveat
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_TS
    torch.jit.save(traced, str(path), _extra_files={"medfed.json": json.dumps(described)})
    return path
