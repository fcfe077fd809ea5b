"""Per-hospital heterogeneity and the on-disk writing shared by every generator.

Real federations are non-IID in three ways at once: hospitals differ in how
many images they have (quantity skew), in what they see (label skew) and in
how their scanners render it (intensity scale, gamma, noise, blur). Each
synthetic site draws all three from its own seeded stream, so a federation
is reproducible from (task, sites, seed) alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import GaussianSmooth

from medfed.shared_models.atomic_files import atomic_write


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital differs from the others."""

    index: int
    num_images: int
    intensity_scale: float
    gamma: float
    noise_std: float
    blur_sigma: float
    class_prevalence: tuple[float, ...]  # classification: P(class); segmentation: P(lesion)


def site_profile(index: int, seed: int, images_per_site: int, num_classes: int) -> SiteProfile:
    rng = np.random.default_rng([seed, index, 0])
    prevalence = rng.dirichlet(np.full(num_classes, 1.2))
    prevalence = 0.75 * prevalence + 0.25 / num_classes  # skewed, yet every class occurs
    return SiteProfile(
        index=index,
        num_images=max(8, round(images_per_site * rng.uniform(0.6, 1.4))),
        intensity_scale=float(rng.uniform(0.7, 1.3)),
        gamma=float(rng.uniform(0.75, 1.35)),
        noise_std=float(rng.uniform(0.02, 0.08)),
        blur_sigma=float(rng.uniform(0.0, 1.0)),
        class_prevalence=tuple(float(p) for p in prevalence),
    )


def scanner_effects(
    image: np.ndarray, profile: SiteProfile, rng: np.random.Generator
) -> np.ndarray:
    """Apply one site's acquisition signature to a clean [0, 1] image."""
    out = np.clip(image, 0.0, None) ** profile.gamma * profile.intensity_scale
    if profile.blur_sigma > 0.05:
        smooth = GaussianSmooth(sigma=profile.blur_sigma)
        out = smooth(torch.from_numpy(out[None].astype(np.float32)))[0].numpy()
    out = out + rng.normal(0.0, profile.noise_std, out.shape)
    return np.clip(out, 0.0, None).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Low-frequency texture in roughly [-1, 1] (tissue, not pixel noise)."""
    noise = torch.from_numpy(rng.normal(0.0, 1.0, (1, size, size)).astype(np.float32))
    field = GaussianSmooth(sigma=sigma)(noise)[0].numpy()
    return field / (np.abs(field).max() + 1e-6)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (row = y, column = x)."""
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


def write_site_atomically(
    site_dir: Path, write: Callable[[Path], dict[str, Any]], provenance: dict[str, Any]
) -> None:
    """Write a site into a temporary folder, then rename it into place.

    A crash or a concurrent generator never leaves a half-written site that
    a node would later train on.
    """
    site_dir.parent.mkdir(parents=True, exist_ok=True)

    def write_folder(tmp: Path) -> None:
        tmp.mkdir()
        dataset = write(tmp)
        dataset["synthetic"] = provenance
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))

    try:
        atomic_write(site_dir, write_folder)
    except OSError:
        if not (site_dir / "dataset.json").exists():
            raise  # not a concurrent generator that finished first: a real failure


def provenance(
    task: str, index: int, *, seed: int, images_per_site: int, image_size: int, profile: SiteProfile
) -> dict[str, Any]:
    """What a synthetic site was generated from: rewriting it needs the same values."""
    return {
        "task": task,
        "site": index,
        "seed": seed,
        "images-per-site": images_per_site,
        "image-size": image_size,
        "profile": asdict(profile),
    }


def decathlon_manifest(
    name: str,
    task: str,
    modalities: list[str],
    spatial_dims: int,
    training: list[dict],
    **extra: Any,
) -> dict[str, Any]:
    """A site's dataset.json in the Medical Segmentation Decathlon layout medfed reads."""
    return {
        "name": name,
        "task": task,
        "modality": {str(i): modality for i, modality in enumerate(modalities)},
        "spatial_dims": spatial_dims,
        **extra,
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
