"""Brain-MRI-like 2D slices with tumour-like lesions (edema around a core).

Written as NIfTI image/label pairs in the MSD layout, like BraTS slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfed.client.synthetic.sites import (
    SiteProfile,
    decathlon_manifest,
    grid,
    scanner_effects,
    smooth_noise,
)

LABELS = {"0": "background", "1": "edema", "2": "tumour"}


def brain_slice(rng: np.random.Generator, size: int, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One clean slice in [0, 1] and its label map (0 background, 1 edema, 2 tumour)."""
    y, x = grid(size)
    a, b = rng.uniform(0.72, 0.86), rng.uniform(0.82, 0.94)
    head = (x / a) ** 2 + (y / b) ** 2
    brain = head < 0.8
    image = np.zeros((size, size), np.float32)
    image[(head < 1.0) & ~brain] = 0.85  # skull / scalp
    texture = smooth_noise(rng, size, sigma=size / 24)
    image[brain] = 0.42 + 0.07 * texture[brain]
    for side in (-1, 1):  # lateral ventricles
        vx, vy = side * rng.uniform(0.08, 0.14), rng.uniform(-0.15, 0.05)
        ventricle = ((x - vx) / 0.07) ** 2 + ((y - vy) / 0.2) ** 2 < 1
        image[ventricle & brain] = 0.18

    label = np.zeros((size, size), np.uint8)
    if lesion:
        radius = np.sqrt(rng.uniform(0.0, 0.35))
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = radius * a * np.cos(angle), radius * b * np.sin(angle)
        r_core = rng.uniform(0.07, 0.16)
        r_edema = r_core * rng.uniform(1.5, 2.3)
        theta = np.arctan2(y - cy, x - cx)
        wobble = 1 + 0.18 * np.sin(rng.integers(2, 6) * theta + rng.uniform(0, 2 * np.pi))
        dist = np.hypot(x - cx, y - cy) / wobble
        edema = (dist < r_edema) & brain
        core = (dist < r_core) & brain
        label[edema] = 1
        label[core] = 2
        image[edema] += rng.uniform(0.12, 0.22)
        ring = core & (dist > 0.6 * r_core)  # ring-enhancing core, darker necrotic centre
        image[core] += rng.uniform(0.05, 0.15)
        image[ring] += rng.uniform(0.15, 0.3)
    return image, label


def write_brain_site(out: Path, profile: SiteProfile, seed: int, size: int) -> dict[str, Any]:
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    lesion_rate = 0.55 + 0.4 * profile.class_prevalence[0]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    training = []
    for case in range(profile.num_images):
        rng = np.random.default_rng([seed, profile.index, 1, case])
        image, label = brain_slice(rng, size, lesion=rng.uniform() < lesion_rate)
        image = scanner_effects(image, profile, rng)
        name = f"case_{case:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    return decathlon_manifest(
        f"synthetic-brain-site-{profile.index}", "segmentation", ["MR"], 2, training, labels=LABELS
    )
