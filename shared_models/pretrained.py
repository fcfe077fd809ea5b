"""Transfer learning: initialise a network from a local checkpoint, by name and shape.

Nothing is downloaded. A checkpoint may be a torch state dict file, a MONAI
bundle folder (models/model.pt), or a medfed run folder (global_model.pt).
Tensors whose name and shape match are copied; everything else is reported
with the reason, so an operator sees exactly what the model starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfed.shared_models.run_folder import GLOBAL_MODEL

WRAPPERS = ("state_dict", "model", "network", "arrays")  # common checkpoint layouts
PREFIXES = ("module.", "model.", "net.", "network.")


class PretrainedError(ValueError):
    """The checkpoint cannot initialise this model; the message says why."""


@dataclass
class TransferReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model key -> reason

    def summary(self) -> list[str]:
        lines = [
            f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {key}: {reason}" for key, reason in list(self.skipped.items())[:8]]
        if len(self.skipped) > 8:
            lines.append(f"  ... and {len(self.skipped) - 8} more (see metrics.json)")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": len(self.loaded), "skipped": self.skipped}


def checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / GLOBAL_MODEL, path / "models" / "model.pt"):
            if candidate.is_file():
                return candidate
        raise PretrainedError(
            f"{path}: no global_model.pt (medfed run) or models/model.pt "
            "(MONAI bundle) in this folder"
        )
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path} do not exist")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: not a weights file we can trust
        raise PretrainedError(f"{file}: not a loadable torch weights file ({err})") from None
    while isinstance(state, dict):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = inner
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{file}: holds no tensors by name (expected a state dict)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (DataParallel's `module.`, a bundle's `model.`) when it helps."""
    for prefix in PREFIXES:
        if not state.keys() & model_keys and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(net: nn.Module, path: Path) -> TransferReport:
    """Copy matching tensors into `net`; PretrainedError if none match."""
    target = net.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(target))
    report = TransferReport(source=str(path))
    for key, value in target.items():
        source = state.get(key)
        if source is None:
            report.skipped[key] = "not in the checkpoint"
        elif tuple(source.shape) != tuple(value.shape):
            report.skipped[key] = (
                f"shape {tuple(source.shape)} in the checkpoint, {tuple(value.shape)} in the model"
            )
        else:
            report.loaded.append(key)
    if not report.loaded:
        sample = ", ".join(list(state)[:3])
        raise PretrainedError(
            f"{path}: no tensor matches the model by name and shape "
            f"({len(state)} tensors in the checkpoint, e.g. {sample})"
        )
    net.load_state_dict({k: state[k].to(target[k].dtype) for k in report.loaded}, strict=False)
    return report
