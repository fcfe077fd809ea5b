"""What every imaging task provides, and the local training pass they share.

Server and hospitals must agree on the network, the loss and the metric keys;
keeping them in one task object per imaging problem (FLamby's per-task split)
is what makes the same ServerApp and ClientApp work for every task.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from medfed.shared_models.config import RunConfig
from medfed.shared_models.networks import build
from medfed.shared_models.task_descriptions import TaskDescription

Batch = dict[str, Any]


class Task(ABC):
    """One imaging problem: its networks, loss, metrics and batch layout."""

    # What the run config knows of the task without torch (shared_models/task_descriptions.py);
    # its fields are the task's own attributes (task.name, task.models, ...).
    description: ClassVar[TaskDescription]
    name: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    default_classes: ClassVar[tuple[str, ...]]
    headline_metric: ClassVar[str]
    label_kind: ClassVar[str]
    spatial_dims: ClassVar[int]
    default_in_channels: ClassVar[int]
    default_width: ClassVar[int]
    default_image_size: ClassVar[int]
    default_modality: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "description" in cls.__dict__:
            for field in dataclasses.fields(cls.description):
                setattr(cls, field.name, getattr(cls.description, field.name))

    def build_network(self, cfg: RunConfig) -> nn.Module:
        """The network named by `cfg.model`, sized by the config."""
        return build(self.network_spec(cfg))

    def network_spec(self, cfg: RunConfig) -> dict[str, Any]:
        """The network as a MONAI bundle config item (`_target_` and its arguments): what
        `build_network` builds, and what an exported bundle's `network_def` holds."""
        raise ValueError(f"task '{self.name}' has no network a MONAI bundle can describe")

    @abstractmethod
    def build_loss(self, cfg: RunConfig) -> nn.Module:
        """The training loss (also reported as `loss` at evaluation)."""

    @abstractmethod
    def evaluate(
        self, net: nn.Module, batches: Iterable[Batch], cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Metrics on a validation split; keys are identical at every site."""

    def label_bins(self, cfg: RunConfig) -> list[str]:
        """Columns of a site's label histogram (the classes, unless a task bins values)."""
        return list(cfg.classes)

    def label_bin(self, label: float, cfg: RunConfig) -> int:
        """The histogram column of one image-level label."""
        return int(label)

    def outcome(self, metrics: dict[str, float], cfg: RunConfig) -> str | None:
        """What the final model's global `metrics` mean for its use, where the headline
        number alone would mislead a newcomer (None: it speaks for itself)."""
        return None

    def head(self, cfg: RunConfig) -> str:
        """State-dict prefix of the output head (what `freeze = "backbone"` trains)."""
        raise ValueError(f"task '{self.name}' has no separable head to train alone")

    def trainable(self, net: nn.Module, cfg: RunConfig) -> list[nn.Parameter]:
        """Parameters local training updates; with freeze = "backbone", the head only."""
        if cfg.freeze == "none":
            return list(net.parameters())
        head = self.head(cfg)
        params = []
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith(head))
            if param.requires_grad:
                params.append(param)
        return params

    def targets(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """The label tensor in the form the loss expects."""
        return batch["label"].to(device, non_blocking=True)

    def train(
        self,
        net: nn.Module,
        batches: Iterable[Batch],
        cfg: RunConfig,
        device: torch.device,
        proximal_mu: float = 0.0,
        on_batch: Callable[[], None] | None = None,
    ) -> float:
        """Local epochs of optimisation; returns the mean training loss.

        With `proximal_mu > 0` the FedProx term mu/2 * ||w - w_global||^2 is
        added, anchored at the weights the server just sent.
        """
        net.to(device).train()
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            net.to(memory_format=memory_format)
        loss_fn = self.build_loss(cfg)
        optimizer = torch.optim.Adam(self.trainable(net, cfg), lr=cfg.lr)
        anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
        total = torch.zeros((), device=device)
        seen = 0
        for _ in range(cfg.local_epochs):
            for batch in batches:
                images = batch["image"].to(device, non_blocking=True)
                if cfg.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=memory_format)
                targets = self.targets(batch, device)
                with autocast(cfg, device):
                    loss = loss_fn(net(images), targets)
                if anchor:
                    drift = sum(
                        (p - a).pow(2).sum() for p, a in zip(net.parameters(), anchor, strict=True)
                    )
                    loss = loss + proximal_mu / 2 * drift
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # Accumulate on the device: a .item() per step would sync the GPU.
                total += loss.detach() * images.shape[0]
                seen += images.shape[0]
                if on_batch is not None:
                    on_batch()
        if seen == 0:
            raise RuntimeError("no training images: the site's training split is empty")
        return float(total.item()) / seen


def autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the run asks for it; a no-op otherwise."""
    if cfg.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
