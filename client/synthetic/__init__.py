"""Synthetic hospitals in the on-disk site format, for demos, tests and research.

They go through exactly the loading code that real site folders go through.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from medfed.client.synthetic.brain_mri import LABELS as BRAIN_LABELS
from medfed.client.synthetic.brain_mri import write_brain_site
from medfed.client.synthetic.brain_mri3d import LABELS as BRATS_LABELS
from medfed.client.synthetic.brain_mri3d import write_brain3d_site
from medfed.client.synthetic.chest_xray import LABELS as XRAY_LABELS
from medfed.client.synthetic.chest_xray import write_xray_site
from medfed.client.synthetic.hand_xray import write_hand_site
from medfed.client.synthetic.sites import provenance, site_profile, write_site_atomically

GENERATORS = {
    "segmentation": (write_brain_site, len(BRAIN_LABELS)),
    "segmentation3d": (write_brain3d_site, len(BRATS_LABELS)),
    "classification": (write_xray_site, len(XRAY_LABELS)),
    "regression": (write_hand_site, 2),  # the class prevalence draw is unused here
    "gan": (write_xray_site, len(XRAY_LABELS)),  # GANs learn the chest X-rays
}


# Volumes cost the cube of their size: 3D sites default to fewer, smaller images.
DEFAULT_SIZE = {"segmentation3d": (24, 32)}  # task -> (images per site, image size)


def generate_site(
    task: str,
    index: int,
    out: Path,
    seed: int = 0,
    images_per_site: int | None = None,
    image_size: int | None = None,
    class_prevalence: tuple[float, ...] | None = None,
) -> Path:
    """Write synthetic hospital `index` to `out`; reuse it if already written identically.

    `class_prevalence` replaces the site's drawn label mix (e.g. to make a class rare).
    """
    if task not in GENERATORS:
        raise ValueError(f"no synthetic generator for task '{task}' (have {', '.join(GENERATORS)})")
    default_images, default_size = DEFAULT_SIZE.get(task, (60, 64))
    images_per_site = images_per_site or default_images
    image_size = image_size or default_size
    write, num_classes = GENERATORS[task]
    profile = site_profile(index, seed, images_per_site, num_classes)
    if class_prevalence is not None:
        if len(class_prevalence) != num_classes or abs(sum(class_prevalence) - 1) > 1e-6:
            raise ValueError(
                f"class prevalence {class_prevalence}: needs {num_classes} values summing to 1"
            )
        profile = replace(profile, class_prevalence=tuple(class_prevalence))
    wanted = provenance(
        task, index, seed=seed, images_per_site=images_per_site, image_size=image_size,
        profile=profile,
    )  # fmt: skip
    manifest = out / "dataset.json"
    if manifest.exists():
        existing = json.loads(manifest.read_text()).get("synthetic")
        if existing != json.loads(json.dumps(wanted)):
            raise FileExistsError(
                f"{out} already holds a different site; choose another --out or remove it"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a synthetic site; refusing to overwrite")
    if out.exists():
        out.rmdir()
    write_site_atomically(out, lambda tmp: write(tmp, profile, seed, image_size), wanted)
    return out


def generate_federation(
    task: str,
    sites: int,
    out: Path,
    seed: int = 0,
    images_per_site: int | None = None,
    image_size: int | None = None,
) -> list[Path]:
    """One folder per hospital: out/site-0, out/site-1, ..."""
    return [
        generate_site(
            task,
            i,
            out / f"site-{i}",
            seed=seed,
            images_per_site=images_per_site,
            image_size=image_size,
        )
        for i in range(sites)
    ]
