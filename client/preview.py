"""Pictures of a global model's predictions on one site's own validation images.

This runs where the images are (a hospital, or a researcher's simulation):
the coordinator never sees images, so it cannot draw these itself.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from medfed.client.data.check import middle_slice
from medfed.client.data.loader import make_loader
from medfed.client.data.site import load_site
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import PLOTS, PREDICTIONS_PNG, load_global_model
from medfed.shared_models.tasks import TASKS


def save_predictions(run_dir: Path, site_folder: Path, count: int = 6) -> Path:
    """Overlay predictions on `count` validation images of one site (the run's first)."""
    cfg, net = load_global_model(run_dir)
    if cfg.task == "gan":
        return _save_gan_grid(run_dir, cfg, net)
    site = load_site(site_folder, cfg)
    cpu = torch.device("cpu")
    batch = next(iter(make_loader(site, site.val[:count], cfg, train=False, device=cpu)))
    with torch.no_grad():
        logits = net(batch["image"])
    kind = TASKS[cfg.task].label_kind
    fig, axes = plt.subplots(1, len(logits), figsize=(2.2 * len(logits), 2.6), squeeze=False)
    for i, axis in enumerate(axes[0]):
        axis.imshow(middle_slice(batch["image"][i, 0]).T, cmap="gray")
        axis.axis("off")
        if kind == "mask":
            truth = middle_slice(batch["label"][i, 0])
            predicted = middle_slice(logits[i].argmax(0))
            levels = [k + 0.5 for k in range(len(cfg.classes) - 1)]
            axis.contour(truth.T, levels=levels, colors="yellow", linewidths=0.8)
            axis.contour(predicted.T, levels=levels, colors="red", linewidths=0.8)
        elif kind == "value":
            truth, predicted = float(batch["label"][i]), float(logits[i].view(-1)[0])
            axis.set_title(f"{truth:.0f} → {predicted:.0f}", fontsize=8)
        else:
            truth, predicted = int(batch["label"][i]), int(logits[i].argmax())
            colour = "green" if truth == predicted else "red"
            axis.set_title(
                f"{cfg.classes[truth]} → {cfg.classes[predicted]}", fontsize=8, color=colour
            )
    titles = {
        "mask": "ground truth (yellow) vs global model (red)",
        "value": f"true → predicted {cfg.classes[0]}",
        "class": "true → predicted class",
    }
    fig.suptitle(f"{site.name}: {titles[kind]}", fontsize=9)
    return _save(fig, run_dir)


def _save_gan_grid(run_dir: Path, cfg: RunConfig, net: torch.nn.Module, per_class: int = 6) -> Path:
    """Rows of generated images, one row per class (a GAN has no 'prediction')."""
    labels = torch.arange(len(cfg.classes)).repeat_interleave(per_class)
    with torch.no_grad():
        images = net.generate(labels, torch.Generator().manual_seed(cfg.seed))[:, 0]
    fig, axes = plt.subplots(
        len(cfg.classes),
        per_class,
        figsize=(1.5 * per_class, 1.6 * len(cfg.classes)),
        squeeze=False,
    )
    for axis, image, label in zip(axes.flat, images, labels, strict=True):
        axis.imshow(image.T, cmap="gray", vmin=0, vmax=1)
        axis.axis("off")
        axis.set_title(cfg.classes[int(label)], fontsize=7)
    fig.suptitle("global generator: one row per class", fontsize=9)
    return _save(fig, run_dir)


def _save(fig: plt.Figure, run_dir: Path) -> Path:
    """The figure as the run's plots/predictions.png."""
    fig.tight_layout()
    path = run_dir / PLOTS / PREDICTIONS_PNG
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
