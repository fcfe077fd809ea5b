"""Data-path benchmark: what a node spends before its GPU sees a batch.

    python -m tests.bench.data_path [--images 300] [--size 128] [--out DIR]

On one synthetic site (NIfTI segmentation pairs and PNG classification
images) it measures, in the same run:
  raw read     MONAI LoadImage of every file, no transforms (the floor)
  scan         load_site's first scan (decode + checks) vs the cached re-scan
  epoch 1      the training DataLoader with an empty PersistentDataset cache
  epoch 2      the same in a fresh loader (as the next round's process would)
and prints images/s with the ratios epoch1/raw and epoch2/epoch1. Writes
data_path.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from monai.transforms import LoadImage

from medfed.client.data.loader import make_loader
from medfed.client.data.site import load_site
from medfed.client.data.transforms import READERS
from medfed.client.synthetic import generate_site
from medfed.shared_models.config import RunConfig
from tests.bench.runs import save_results

CPU = torch.device("cpu")


def images_per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_task(task: str, root: Path, images: int, size: int) -> dict:
    site_dir = generate_site(task, 0, root / task, seed=0, images_per_site=images, image_size=size)
    cfg = RunConfig.from_mapping({"task": task, "image-size": 64, "batch-size": 16})
    cache = root / f"cache-{task}"

    start = time.perf_counter()
    site = load_site(site_dir, cfg, cache_dir=cache)
    scan_cold = time.perf_counter() - start
    start = time.perf_counter()
    site = load_site(site_dir, cfg, cache_dir=cache)
    scan_warm = time.perf_counter() - start
    entries = site.train
    files = [e[k] for e in entries for k in ("image", "label") if isinstance(e[k], str)]

    reader = LoadImage(reader=READERS, image_only=True)
    start = time.perf_counter()
    for path in files:
        reader(path)
    raw = time.perf_counter() - start

    epochs = []
    for _ in range(2):  # a fresh loader each time, as each round's ClientApp process builds
        loader = make_loader(site, entries, cfg, train=True, device=CPU, cache_dir=cache, workers=0)
        start = time.perf_counter()
        seen = sum(batch["image"].shape[0] for batch in loader)
        epochs.append(time.perf_counter() - start)
        assert seen == len(entries)
    n = len(entries)
    return {
        "task": task,
        "images": n,
        "files-per-image": len(files) / n,
        "raw-read-img-s": images_per_second(n, raw),
        "scan-cold-s": scan_cold,
        "scan-warm-s": scan_warm,
        "epoch1-img-s": images_per_second(n, epochs[0]),
        "epoch2-img-s": images_per_second(n, epochs[1]),
        "epoch1-vs-raw": raw / epochs[0],
        "epoch2-vs-epoch1": epochs[0] / epochs[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=128, help="stored image size (pixels)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medfed-bench-"))
    try:
        results = [
            bench_task(t, root, args.images, args.size) for t in ("segmentation", "classification")
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{'task':15} {'images':>6} {'raw img/s':>10} {'epoch1 img/s':>13} "
        f"{'epoch2 img/s':>13} {'e1/raw':>7} {'e2/e1':>6} {'scan cold→warm s':>17}"
    )
    for r in results:
        print(
            f"{r['task']:15} {r['images']:>6} {r['raw-read-img-s']:>10.0f} "
            f"{r['epoch1-img-s']:>13.0f} {r['epoch2-img-s']:>13.0f} "
            f"{r['epoch1-vs-raw']:>7.2f} {r['epoch2-vs-epoch1']:>6.2f} "
            f"{r['scan-cold-s']:>8.2f} → {r['scan-warm-s']:.2f}"
        )
    save_results(args.out, "data_path.json", results)


if __name__ == "__main__":
    main()
