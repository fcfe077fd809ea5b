"""Decode every entry once and decide whether it is usable.

Corrupt, truncated or non-image files, image/label shape mismatches, label
values outside the declared classes, wrong dimensionality and duplicates are
found here, before training, and become Problems instead of crashes. Results
are cached per file fingerprint (path, size, mtime), so a node's later rounds
only stat its files.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import EnsureChannelFirst, LoadImage

from medfed.client.data.image_headers import size_problem
from medfed.client.data.manifest import Problem
from medfed.client.data.transforms import READERS
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.config import RunConfig

SCAN_VERSION = 1


@dataclass(frozen=True)
class ScanSpec:
    """What a usable entry must look like for this run."""

    label_kind: str  # "mask", "class" or "value"
    num_classes: int
    spatial_dims: int
    in_channels: int
    max_megabytes: int = RunConfig.max_image_megabytes  # larger declared images: not read


def spatial_shape(shape: tuple[int, ...], spatial_dims: int) -> tuple[int, ...] | None:
    """Channel-first shape -> spatial shape with extra singleton axes dropped (or None)."""
    spatial = list(shape[1:])
    while len(spatial) > spatial_dims and 1 in spatial:
        spatial.remove(1)
    return tuple(spatial) if len(spatial) == spatial_dims else None


class Scanner:
    """Scans entries with a fingerprint cache in `cache_dir` (if given)."""

    def __init__(self, spec: ScanSpec, cache_dir: Path | None) -> None:
        self.spec = spec
        self.cache_file = cache_dir / "scan.json" if cache_dir else None
        self.cache: dict[str, Any] = {}
        if self.cache_file and self.cache_file.exists():
            try:
                self.cache = json.loads(self.cache_file.read_text())
            except (json.JSONDecodeError, OSError):
                self.cache = {}  # a damaged cache is rebuilt, never trusted
        self.loader = LoadImage(reader=READERS, image_only=True)
        self.channel_first = EnsureChannelFirst()

    def scan(
        self, entries: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[Problem], dict[str, dict[str, Any]]]:
        """Usable entries (in order), problems, and per-entry facts keyed by `where`."""
        usable, problems, facts = [], [], {}
        seen: dict[str, str] = {}
        for entry in entries:
            key = self._fingerprint(entry)
            result = self.cache.get(key) if key else None
            if result is None:
                result = self._inspect(entry)
                if key:
                    self.cache[key] = result
            if "problem" in result:
                problems.append(Problem(entry["where"], result["problem"]))
                continue
            info = result["info"]
            if info["digest"] in seen:
                problems.append(Problem(entry["where"], f"duplicate of {seen[info['digest']]}"))
                continue
            seen[info["digest"]] = entry["where"]
            if key:
                entry["fingerprint"] = key
            usable.append(entry)
            facts[entry["where"]] = info
        self._save()
        return usable, problems, facts

    def _save(self) -> None:
        if not self.cache_file:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.cache_file, json.dumps(self.cache).encode())

    def _fingerprint(self, entry: dict[str, Any]) -> str | None:
        if not isinstance(entry["image"], str):
            return None  # in-memory arrays (.npz) are cheap to re-check
        parts = [str(SCAN_VERSION), repr(self.spec)]
        for key in ("image", "label"):
            value = entry[key]
            if isinstance(value, str):
                parts.append(_file_signature(Path(value)))
            else:
                parts.append(repr(value))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _inspect(self, entry: dict[str, Any]) -> dict[str, Any]:
        for key in ("image", "label"):
            too_large = self._too_large(entry.get(key))
            if too_large:
                return {"problem": f"{key} too large: {too_large}"}
        try:
            image = self._load(entry["image"])
        except Exception as err:  # any reader failure makes this one file unusable
            return {"problem": f"unreadable image: {unreadable(err, entry['image'])}"}
        spec = self.spec
        shape = spatial_shape(tuple(image.shape), spec.spatial_dims)
        if shape is None:
            return {
                "problem": f"expected a {spec.spatial_dims}D image, found array shape "
                f"{tuple(image.shape)[1:]}"
            }
        channels = image.shape[0]
        if channels != spec.in_channels and not (spec.in_channels == 1 and channels in (3, 4)):
            return {"problem": f"{channels} channels, the run expects {spec.in_channels}"}
        values = image.float().flatten()
        if not torch.isfinite(values).all():
            return {"problem": "image contains NaN or infinite values"}
        sample = values[:: max(1, values.numel() // 100_000)]
        info: dict[str, Any] = {
            "shape": list(shape),
            "channels": int(channels),
            "spacing": _spacing(image, spec.spatial_dims),
            "intensity": [
                float(values.min()),
                float(torch.quantile(sample, 0.01)),
                float(torch.quantile(sample, 0.99)),
                float(values.max()),
            ],
            "digest": hashlib.sha256(image.numpy().tobytes()).hexdigest(),
        }
        if spec.label_kind == "class":
            info["label"] = int(entry["label"])
            return {"info": info}
        if spec.label_kind == "value":
            info["label"] = float(entry["label"])
            return {"info": info}
        return self._inspect_mask(entry, shape, info)

    def _inspect_mask(
        self, entry: dict[str, Any], shape: tuple[int, ...], info: dict[str, Any]
    ) -> dict[str, Any]:
        """A segmentation entry's mask: same shape as its image, values among the classes."""
        spec = self.spec
        try:
            label = self._load(entry["label"])
        except Exception as err:  # a broken mask makes its pair unusable
            return {"problem": f"unreadable label: {unreadable(err, entry['label'])}"}
        label_shape = spatial_shape(tuple(label.shape), spec.spatial_dims)
        if label_shape != shape:
            return {
                "problem": f"image shape {shape} differs from label shape "
                f"{label_shape or tuple(label.shape)[1:]}"
            }
        present = torch.unique(label)
        if not torch.equal(present, present.round()):
            return {"problem": "label mask has non-integer values"}
        outside = [int(v) for v in present if not 0 <= v < spec.num_classes]
        if outside:
            return {
                "problem": f"label values {outside} outside the declared labels "
                f"0..{spec.num_classes - 1}"
            }
        info["label-values"] = [int(v) for v in present]
        return {"info": info}

    def _too_large(self, source: Any) -> str | None:
        """Why a file would decode to more than the limit, from its header (None if not)."""
        if not isinstance(source, str):
            return None  # a class index, a value, or an array already in memory
        return size_problem(source, self.spec.max_megabytes)

    def _load(self, source: Any) -> torch.Tensor:
        if isinstance(source, np.ndarray):
            array = torch.as_tensor(source)
            return array[None] if array.dim() == self.spec.spatial_dims else array.movedim(-1, 0)
        return self.channel_first(self.loader(source))


def _file_signature(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def _spacing(image: Any, spatial_dims: int) -> list[float] | None:
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None:
        return None
    return [round(float(v), 4) for v in list(pixdim)[:spatial_dims]]


KNOWN_FORMATS = {
    ".nii": "NIfTI",
    ".gz": "NIfTI",
    ".dcm": "DICOM",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".npy": "NumPy",
}


def unreadable(err: Exception, source: Any) -> str:
    """Why a reader could not take `source`, in the words a hospital acts on (a file
    every MONAI reader refused is corrupt or truncated, or not an image at all)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    suffix = Path(str(source)).suffix.lower()
    # a compressed file cut short: the reader took it, its decompression ran out of bytes
    cut_short = isinstance(err, EOFError | zlib.error) and suffix in KNOWN_FORMATS
    if "suitable reader" in text or cut_short:  # every reader refused the file
        if suffix in KNOWN_FORMATS:
            return f"corrupt or truncated {KNOWN_FORMATS[suffix]} file"
        return f"not an image file ({suffix or 'no suffix'}; NIfTI, DICOM, PNG/JPEG expected)"
    return text[:200]
