"""BraTS-like multi-channel MRI volumes with tumour sub-regions.

Four channels (T1, T1ce, T2, FLAIR) show the regions with their usual
contrasts: necrotic core dark on T1ce, enhancing rim bright on T1ce, edema
bright on T2 and FLAIR. Labels: 0 background, 1 necrotic core, 2 edema,
3 enhancing tumour. Written as 4D NIfTI images (channel last) and 3D masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import GaussianSmooth

from medfed.client.synthetic.sites import SiteProfile, decathlon_manifest, scanner_effects

LABELS = {"0": "background", "1": "necrotic-core", "2": "edema", "3": "enhancing"}
# intensity of (brain, ventricle, necrotic core, edema, enhancing) per channel
CONTRAST = {
    "T1": (0.55, 0.2, 0.3, 0.45, 0.5),
    "T1ce": (0.55, 0.2, 0.25, 0.5, 0.95),
    "T2": (0.45, 0.9, 0.75, 0.8, 0.6),
    "FLAIR": (0.5, 0.15, 0.55, 0.9, 0.7),
}


def brain_volume(
    rng: np.random.Generator, size: int, lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Clean channels (4, S, S, S) in [0, 1] and the label volume (S, S, S)."""
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    radii = rng.uniform(0.7, 0.85, 3)
    head = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2
    brain = head < 0.8
    ventricles = np.zeros_like(brain)
    for side in (-1, 1):
        ventricles |= ((x - side * 0.12) / 0.08) ** 2 + (y / 0.25) ** 2 + (z / 0.2) ** 2 < 1
    label = np.zeros((size,) * 3, np.uint8)
    if lesion:
        centre = rng.uniform(-0.3, 0.3, 3)
        distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        r_core = rng.uniform(0.08, 0.14)
        r_enh = r_core * rng.uniform(1.4, 1.8)
        r_edema = r_enh * rng.uniform(1.5, 2.0)
        label[(distance < r_edema) & brain] = 2
        label[(distance < r_enh) & brain] = 3
        label[(distance < r_core) & brain] = 1
    texture = GaussianSmooth(sigma=size / 16)(
        torch.from_numpy(rng.normal(0, 1, (1, size, size, size)).astype(np.float32))
    )[0].numpy()
    texture /= np.abs(texture).max() + 1e-6
    channels = []
    for brain_v, ventricle_v, core_v, edema_v, enh_v in CONTRAST.values():
        volume = np.zeros((size,) * 3, np.float32)
        volume[(head < 1.0) & ~brain] = 0.3  # skull and scalp
        volume[brain] = brain_v + 0.06 * texture[brain]
        volume[brain & ventricles] = ventricle_v
        for value, region in ((core_v, 1), (edema_v, 2), (enh_v, 3)):
            volume[label == region] = value + 0.04 * texture[label == region]
        channels.append(volume)
    return np.stack(channels), label


def write_brain3d_site(out: Path, profile: SiteProfile, seed: int, size: int) -> dict[str, Any]:
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    lesion_rate = 0.7 + 0.25 * profile.class_prevalence[0]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    training = []
    for case in range(profile.num_images):
        rng = np.random.default_rng([seed, profile.index, 5, case])
        channels, label = brain_volume(rng, size, lesion=rng.uniform() < lesion_rate)
        image = np.stack([scanner_effects(c, profile, rng) for c in channels], axis=-1)
        name = f"case_{case:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), out / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    return decathlon_manifest(
        f"synthetic-brats-site-{profile.index}", "segmentation3d", ["MR"] * 4, 3, training,
        channels=list(CONTRAST), labels=LABELS,
    )  # fmt: skip
