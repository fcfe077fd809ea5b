"""Using a federated GAN at a site: augmentation of scarce classes, and sampling.

A hospital with few COVID-like images borrows the federation's knowledge of
them through the federated GAN, without seeing any other site's images.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from medfed.client.data.site import SiteDataset
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import RunFolderError, load_global_model, read_model_config


def apportion(total: int, shares: list[int]) -> list[int]:
    """`total` split in proportion to `shares` (evenly where all are 0), by largest
    remainders, so the parts add up to exactly `total` (rounding each would not)."""
    weights = shares if any(shares) else [1] * len(shares)
    quotas = [total * w / sum(weights) for w in weights]
    parts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (parts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def load_generator(run_dir: Path) -> tuple[RunConfig, torch.nn.Module]:
    """The global model of a finished `gan` run (model.json + global_model.pt)."""
    task = read_model_config(run_dir).task
    if task != "gan":
        raise RunFolderError(f"{run_dir}: is a '{task}' run, not a gan run")
    return load_global_model(run_dir)


def generated_items(site: SiteDataset, cfg: RunConfig, server_round: int) -> list[dict[str, Any]]:
    """round(ratio x train size) generated images, mostly of the site's scarce classes.

    Each class gets images in proportion to how far it falls short of the
    site's most frequent class, so classes the site lacks get the most (a
    balanced site gets them evenly). Exactly round(ratio x train size): the
    count the site reports is then a public function of its train count, and
    hidden with it (client/privacy/disclosure), never a clue to its class balance.
    """
    gan_cfg, gan = load_generator(Path(cfg.gan_model).expanduser())
    if gan_cfg.classes != cfg.classes or gan_cfg.image_size != cfg.image_size:
        raise ValueError(
            f"gan-model {cfg.gan_model}: classes {gan_cfg.classes} at "
            f"{gan_cfg.image_size}px do not match this run's {cfg.classes} at "
            f"{cfg.image_size}px"
        )
    counts = Counter(int(e["label"]) for e in site.train)
    most = max(counts.values())
    shortfall = {c: most - counts.get(c, 0) for c in range(len(cfg.classes))}
    total = round(cfg.gan_augment_ratio * len(site.train))
    if total == 0:
        return []
    labels = []
    for c, count in enumerate(apportion(total, list(shortfall.values()))):
        labels += [c] * count
    seed = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round)
    with torch.no_grad():
        images = gan.generate(torch.tensor(labels), seed)
    return [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]


def class_index(classes: tuple[str, ...], given: str) -> int:
    """The index of a class given by its name or by its index (a name wins: classes may be
    named by digits); a ValueError listing the valid classes otherwise."""
    if given in classes:
        return classes.index(given)
    if given.strip().isdigit() and int(given) < len(classes):
        return int(given)
    valid = ", ".join(f"{i} {name}" for i, name in enumerate(classes))
    raise ValueError(f"--class {given!r}: not one of the gan's classes ({valid})")


def sample_images(
    run_dir: Path, count: int, class_name: str, out: Path, seed: int = 0
) -> list[Path]:
    """`count` PNG images of one class (its name or index) from a gan run, plus grid.png of
    them all; the files are named after the class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    gan_cfg, gan = load_generator(run_dir)
    label = class_index(gan_cfg.classes, class_name)
    class_name = gan_cfg.classes[label]
    with torch.no_grad():
        images = gan.generate(torch.full((count,), label), torch.Generator().manual_seed(seed))[
            :, 0
        ].numpy()
    out.mkdir(parents=True, exist_ok=True)
    # the class name comes from the run folder's model.json: letters, digits, '-' and '_'
    # of it name the files, never a path ('../x' would write outside --out)
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", class_name) or f"class{label}"
    paths = []
    for i, image in enumerate(images):
        path = out / f"{stem}-{i:04d}.png"
        # medfed's images are stored width-first (MONAI's reader order); PNG wants rows.
        Image.fromarray((np.clip(image.T, 0, 1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    columns = min(8, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image in zip(axes.flat, images, strict=False):
        axis.imshow(image.T, cmap="gray", vmin=0, vmax=1)
    fig.suptitle(f"{count} generated '{class_name}' images", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=90)
    plt.close(fig)
    return paths
