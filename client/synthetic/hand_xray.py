"""Hand-X-ray-like radiographs whose skeletal maturity follows the child's age.

With age (months) the hand grows, more carpal ossification centres appear,
and the growth plates between epiphyses and phalanges close — the features
radiologists read bone age from (Greulich-Pyle). Sites differ in their age
distribution. Written as DICOM DX files; the label is the age in months.
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

MAX_AGE = 216.0  # 18 years


def _bar(x, y, start, end, half_width):
    """Pixels within `half_width` of the segment from `start` to `end` (x, y points)."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) < half_width


def hand_xray(rng: np.random.Generator, size: int, age: float) -> np.ndarray:
    """One clean radiograph in [0, 1] of a left hand at `age` months."""
    y, x = grid(size)
    maturity = age / MAX_AGE
    scale = 1.3 * (0.62 + 0.38 * maturity**0.7)  # the hand grows
    image = np.full((size, size), 0.05, np.float32)
    palm_y = 0.3
    image[((x / (0.42 * scale)) ** 2 + ((y - palm_y) / (0.32 * scale)) ** 2) < 1] = 0.3
    gap = 0.05 * max(0.0, 1.0 - age / 168.0)  # growth plates close by ~14 years
    bone = 0.75 + rng.uniform(-0.05, 0.05)
    for finger in range(5):
        angle = np.deg2rad(-35 + finger * 17.5 + rng.uniform(-3, 3))
        base_x, base_y = (-0.3 + 0.15 * finger) * scale, palm_y - 0.12 * scale
        length = (0.5 if finger in (1, 2, 3) else 0.38) * scale
        tip_x, tip_y = base_x + np.sin(angle) * length, base_y - np.cos(angle) * length
        image[_bar(x, y, (base_x, base_y), (tip_x, tip_y), 0.055 * scale)] = 0.3  # soft tissue
        # metacarpal, then 3 (thumb: 2) phalanges with an epiphysis cap at each base
        image[_bar(x, y, (base_x * 0.6, palm_y + 0.2 * scale), (base_x, base_y), 0.022 * scale)] = (
            bone
        )
        segments = 2 if finger == 0 else 3
        for k in range(segments):
            t0, t1 = k / segments, (k + 1) / segments - 0.04
            sx, sy = base_x + (tip_x - base_x) * t0, base_y + (tip_y - base_y) * t0
            ex, ey = base_x + (tip_x - base_x) * t1, base_y + (tip_y - base_y) * t1
            cap = min(0.3, gap / max(length / segments, 1e-3) + 0.12)
            cx, cy = sx + (ex - sx) * cap, sy + (ey - sy) * cap
            image[_bar(x, y, (cx, cy), (ex, ey), 0.02 * scale)] = bone  # shaft
            if age > 12:
                gx, gy = sx + (ex - sx) * (cap - gap), sy + (ey - sy) * (cap - gap)
                image[_bar(x, y, (sx, sy), (gx, gy), 0.018 * scale)] = bone  # epiphysis
    centres = int(np.clip(round(age / 22.0), 0, 8))
    for k in range(centres):  # carpal ossification centres appear one by one
        cx = (-0.16 + 0.09 * (k % 4)) * scale
        cy = palm_y + (0.2 + 0.08 * (k // 4)) * scale
        radius = (0.02 + 0.025 * maturity) * scale
        image[np.hypot(x - cx, y - cy) < radius] = bone
    image += 0.03 * smooth_noise(rng, size, sigma=size / 16)
    return np.clip(image, 0.0, 1.0)


def write_hand_site(out: Path, profile: SiteProfile, seed: int, size: int) -> dict[str, Any]:
    (out / "imagesTr").mkdir()
    site_rng = np.random.default_rng([seed, profile.index, 3])
    mean_age, spread = site_rng.uniform(50, 170), site_rng.uniform(25, 45)
    spacing = 200.0 / size  # a 20 cm field of view
    training = []
    for case in range(profile.num_images):
        rng = np.random.default_rng([seed, profile.index, 4, case])
        age = float(np.clip(rng.normal(mean_age, spread), 6, MAX_AGE))
        image = scanner_effects(hand_xray(rng, size, age), profile, rng)
        name = f"case_{case:04d}.dcm"
        uid = f"{seed}-{profile.index}-4-{case}"
        write_radiograph(out / "imagesTr" / name, image, "DX", spacing, uid)
        training.append({"image": f"imagesTr/{name}", "label": round(age, 1)})
    return decathlon_manifest(
        f"synthetic-hand-xray-site-{profile.index}", "regression", ["DX"], 2, training
    )
