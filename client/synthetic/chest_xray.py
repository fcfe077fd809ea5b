"""Chest-X-ray-like images: normal, pneumonia-like and COVID-like patterns.

Pneumonia-like: one dense focal consolidation, usually in a lower zone.
COVID-like: several faint bilateral, peripheral ground-glass patches.
Written as DICOM CR files (12-bit, pixel spacing set) with a dataset.json
carrying integer labels, so the DICOM reading path is what the demo uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.synthetic.dicom import write_radiograph
from medfed.client.synthetic.sites import (
    SiteProfile,
    decathlon_manifest,
    grid,
    scanner_effects,
    smooth_noise,
)

LABELS = {"0": "normal", "1": "pneumonia", "2": "covid"}


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))


def chest_xray(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """One clean radiograph in [0, 1] showing the pattern of class `label`."""
    y, x = grid(size)
    image = np.full((size, size), 0.08, np.float32)
    image[(x / 0.92) ** 2 + ((y - 0.05) / 1.1) ** 2 < 1] = 0.62  # thorax
    lungs = []
    for side in (-1, 1):
        cx, cy = side * rng.uniform(0.36, 0.44), rng.uniform(-0.05, 0.05)
        lung = ((x - cx) / rng.uniform(0.26, 0.32)) ** 2 + (
            (y - cy) / rng.uniform(0.6, 0.7)
        ) ** 2 < 1
        image[lung] = 0.24
        lungs.append((cx, cy, lung))
    ribs = 0.06 * (np.sin(y * rng.uniform(16, 20) + 0.9 * x**2 * 6) > 0.6)
    image += ribs * (image < 0.3)
    image += 0.25 * _blob(x, y, -0.05, 0.25, 0.18)  # heart shadow
    image += 0.04 * smooth_noise(rng, size, sigma=size / 20)

    if label == 1:  # pneumonia-like: one dense focal consolidation
        cx, cy, lung = lungs[rng.integers(2)]
        bx, by = cx + rng.uniform(-0.1, 0.1), cy + rng.uniform(0.05, 0.4)
        image += rng.uniform(0.22, 0.35) * _blob(x, y, bx, by, rng.uniform(0.07, 0.13)) * lung
    elif label == 2:  # COVID-like: bilateral peripheral ground glass
        for side, (cx, cy, lung) in zip((-1, 1), lungs, strict=True):
            for _ in range(rng.integers(2, 4)):
                bx = cx + side * rng.uniform(0.1, 0.22)
                by = cy + rng.uniform(-0.3, 0.45)
                image += rng.uniform(0.1, 0.16) * _blob(x, y, bx, by, rng.uniform(0.06, 0.1)) * lung
    return np.clip(image, 0.0, 1.0)


def write_xray_site(out: Path, profile: SiteProfile, seed: int, size: int) -> dict[str, Any]:
    (out / "imagesTr").mkdir()
    spacing = 360.0 / size  # a 36 cm chest
    training = []
    for case in range(profile.num_images):
        rng = np.random.default_rng([seed, profile.index, 2, case])
        label = int(rng.choice(len(LABELS), p=np.asarray(profile.class_prevalence)))
        image = scanner_effects(chest_xray(rng, size, label), profile, rng)
        name = f"case_{case:04d}.dcm"
        uid = f"{seed}-{profile.index}-2-{case}"
        write_radiograph(out / "imagesTr" / name, image, "CR", spacing, uid)
        training.append({"image": f"imagesTr/{name}", "label": label})
    return decathlon_manifest(
        f"synthetic-chest-xray-site-{profile.index}", "classification", ["CR"], 2, training,
        labels=LABELS,
    )  # fmt: skip
