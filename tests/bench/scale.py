"""How `medfed simulate` scales with the number of simulated hospitals on one machine.

    python -m tests.bench.scale [--sites 5,10,25,50] [--rounds 4] [--images-per-site 60]

Each size is a fresh `medfed simulate --task classification` (small CNN, one
CPU per hospital, synthetic non-IID sites) in its own process tree. Seconds
per round are the steady state, rounds 2..R (round 1 also starts the Ray
workers); the work of a round is the images the hospitals trained on
(examples x local epochs, counted in the synthetic sites), so "s per 1000 images" and its
ratio to the smallest federation show whether time grows faster than the
work. Memory is the peak PSS of the whole process tree (tests/bench/memory.py):
SuperLink, SuperExec, ServerApp, Ray and its workers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medfed.client.data.site import load_site
from medfed.client.data.site_paths import site_folders
from medfed.shared_models.config import RunConfig
from tests.bench.memory import GIB, PeakTreeMemory


def training_images(data: Path, config: dict) -> dict[str, int]:
    """Each synthetic site's training images. The bench holds the sites (`out/data`), so it
    counts them itself: metrics.json shows a count only where the site's floor allows."""
    cfg = RunConfig.from_mapping(config)
    return {folder.name: len(load_site(folder, cfg).train) for folder in site_folders(data)}


def measure(sites: int, rounds: int, images_per_site: int, out: Path) -> dict:
    """One federation of `sites` hospitals; its round times, work and peak memory."""
    command = [
        sys.executable, "-m", "medfed.server.cli", "simulate", "--task", "classification",
        "--sites", str(sites), "--rounds", str(rounds), "--images-per-site",
        str(images_per_site), "--out", str(out), "-c", "federated-stats=false",
        "-c", f"min-nodes={sites}",
    ]  # fmt: skip
    started = time.monotonic()
    with (out.parent / f"{out.name}.log").open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with PeakTreeMemory(child.pid) as memory:
            code = child.wait()
        memory.kill_leftovers()  # medfed stops what it started; this is only a safety net
    wall = time.monotonic() - started
    record = json.loads((out / "metrics.json").read_text()) if code == 0 else {}
    if code != 0 or record.get("status") != "completed":
        return {"sites": sites, "error": f"exit {code}; see {out.parent / out.name}.log"}
    steady = record["rounds"][2:] if rounds >= 2 else record["rounds"][1:]
    epochs = record["config"]["local-epochs"]
    train = training_images(out / "data", record["config"])
    images = [
        sum(train[site] for site, m in r["sites"].items() if "train-examples" in m) * epochs
        for r in steady
    ]
    seconds = [r["seconds"] for r in steady]
    return {
        "sites": sites,
        "seconds_per_round": statistics.fmean(seconds),
        "images_per_round": statistics.fmean(images),
        "seconds_per_1000_images": 1000 * sum(seconds) / sum(images),
        "peak_gib": memory.peak / GIB,
        "wall_seconds": wall,
        "replied": min(len(r["replied"]) for r in record["rounds"]),
    }


def table(rows: list[dict]) -> str:
    """Markdown: one line per size, time per image relative to the smallest federation."""
    lines = [
        "| hospitals | images/round | s/round (rounds 2..R) | s per 1000 images | "
        "× per image vs smallest | peak GiB (process tree) | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((r["seconds_per_1000_images"] for r in rows if "error" not in r), math.nan)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['sites']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['sites']} | {r['images_per_round']:.0f} | {r['seconds_per_round']:.2f} | "
            f"{r['seconds_per_1000_images']:.2f} | {r['seconds_per_1000_images'] / base:.2f} | "
            f"{r['peak_gib']:.2f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="5,10,25,50")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images-per-site", type=int, default=60)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sites in (int(n) for n in args.sites.split(",")):
            rows.append(
                measure(sites, args.rounds, args.images_per_site, Path(folder) / str(sites))
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
