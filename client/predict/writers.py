"""What `medfed predict` writes: masks as NIfTI, PNG overlays, one CSV of image-level results."""

from __future__ import annotations

import csv
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medfed.client.data.check import middle_slice


def new_output_folder(out: Path) -> Path:
    """`out`, refused when it exists and is not an empty folder: nothing there is
    overwritten, and no earlier result is left to pass for a new one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a folder that is not empty" if out.is_dir() else "not a folder"
        raise FileExistsError(f"--out {out}: {what}; choose a new one")
    return out


def mask_in_input_shape(mask: np.ndarray, original_shape: tuple[int, ...]) -> np.ndarray:
    """The mask with the singleton axes the reader dropped put back (a 2D slice stored as
    H x W x 1 gets an H x W x 1 mask)."""
    if mask.shape != original_shape and mask.size == int(np.prod(original_shape)):
        return mask.reshape(original_shape)
    return mask


class SaveNiftiMaskd(MapTransform):
    """Write each key's label mask (1, *spatial) as NIfTI with the mask's own affine, named
    after its source image: `<output_dir>/<stem><postfix>.nii.gz`.

    Hand-written, and self-contained because an exported bundle carries its source:
    MONAI 1.6's SaveImage resamples even with resample=False and fails on any affine
    that permutes axes (an oblique or LPI volume).
    """

    def __init__(self, keys: KeysCollection, output_dir: str, postfix: str = "") -> None:
        super().__init__(keys)
        self.output_dir, self.postfix = Path(output_dir), postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        for key in self.key_iterator(dict(data)):
            mask = data[key]
            name = Path(str(mask.meta["filename_or_obj"])).name
            stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.split(".")[0]
            path = self.output_dir / f"{stem}{self.postfix}.nii.gz"
            self.write(np.asarray(mask[0]), np.asarray(mask.affine), path)
        return dict(data)

    @staticmethod
    def write(mask: np.ndarray, affine: np.ndarray, path: Path) -> Path:
        """A label volume (uint8) with the input's affine, so viewers overlay it on the study."""
        image = nib.Nifti1Image(mask.astype(np.uint8), np.asarray(affine, dtype=float))
        image.set_qform(image.affine, code=1)
        image.set_sform(image.affine, code=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, path)
        return path


def write_overlay(image: torch.Tensor, mask: torch.Tensor, classes: list[str], path: Path) -> Path:
    """The (middle slice of the) preprocessed image with the predicted classes outlined.

    Drawn at the network's resolution: the overlay is a quick look, the NIfTI and
    SEG files are the result.
    """
    picture = middle_slice(image[0].as_tensor() if hasattr(image, "as_tensor") else image[0]).T
    outline = middle_slice(mask).T
    fig, axis = plt.subplots(figsize=(3.2, 3.4))
    axis.imshow(picture, cmap="gray")
    if outline.max() > 0:
        levels = [k + 0.5 for k in range(len(classes) - 1)]
        axis.contour(outline, levels=levels, cmap="autumn", linewidths=0.9)
    axis.set_title(path.stem, fontsize=7)
    axis.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """predictions.csv: one row per image, columns in the order of the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
