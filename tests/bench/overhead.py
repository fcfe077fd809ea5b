"""Framework overhead: the demo federation vs one plain PyTorch/MONAI loop doing the same work.

    python -m tests.bench.overhead [--task segmentation] [--rounds 20] [--threads 1,2]

The same work three ways: the demo's synthetic hospitals (3 sites), network,
batch size, learning rate, rounds x local epochs over every site's training
split, and an evaluation of every site's validation split before training and
after each round. (a) `medfed simulate` on those sites; (b) a plain loop in
one process: MONAI transforms cached in memory (CacheDataset), the MONAI
network, Adam, DiceCE / cross-entropy, one pooled DataLoader, run with each
`--threads` setting so the baseline gets its best; (c) a hand-written Flower
app (tests/bench/flower_app.py: Flower's FedAvg and simulation engine, data
cached in each worker, none of medfed's records or checks). All are timed
from process start to exit (imports included) in the same invocation, one
after the other. medfed's time is broken down from its own records (metrics.json
round times and each site's training seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(data: Path, task: str, rounds: int, threads: int) -> dict:
    """The plain loop (runs in its own process); the seconds of each phase."""
    started = time.perf_counter()
    import torch
    from monai.data import CacheDataset, DataLoader

    from medfed.client.data.site import load_site
    from medfed.client.data.site_paths import site_folders
    from medfed.client.data.transforms import site_transforms
    from medfed.shared_models.config import RunConfig
    from medfed.shared_models.tasks import TASKS

    torch.set_num_threads(threads)
    cfg = RunConfig.from_mapping({"task": task, "federated-stats": False})
    sites = [load_site(folder, cfg) for folder in site_folders(data)]  # the same splits

    def pooled(train: bool) -> DataLoader:
        parts = [
            CacheDataset(s.train if train else s.val, site_transforms(cfg, s.modality, train),
                         progress=False)
            for s in sites
        ]  # fmt: skip
        dataset = torch.utils.data.ConcatDataset(parts)
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train, num_workers=0)

    train, val = pooled(True), pooled(False)
    prepared = time.perf_counter()
    torch.manual_seed(cfg.seed)
    task_ = TASKS[task]
    net = task_.build_network(cfg)
    loss_fn = task_.build_loss(cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    training = evaluating = 0.0
    per_round = []
    for server_round in range(rounds + 1):
        began = time.perf_counter()
        for _ in range(cfg.local_epochs if server_round else 0):
            net.train()
            for batch in train:
                loss = loss_fn(net(batch["image"]), task_.targets(batch, torch.device("cpu")))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        middle = time.perf_counter()
        metric = task_.evaluate(net, val, cfg, torch.device("cpu"))[task_.headline_metric]
        training += middle - began
        evaluating += time.perf_counter() - middle
        per_round.append(time.perf_counter() - began)
    return {
        "threads": threads,
        "imports_and_data": prepared - started,
        "training": training,
        "evaluation": evaluating,
        "final_metric": metric,
        "steady_round": statistics.fmean(per_round[2:]),  # rounds 2..R, as medfed's
    }


def _timed(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def measure(task: str, rounds: int, threads: list[int], root: Path) -> dict:
    """Generate the demo sites, then time medfed and each plain-loop setting in turn."""
    from medfed.client.synthetic import generate_federation

    data = root / "data"
    generate_federation(task, 3, data, seed=0)
    results: dict = {"task": task, "rounds": rounds, "plain": []}
    for n in threads:
        phases = root / f"plain-{n}.json"
        command = [sys.executable, "-m", "tests.bench.overhead", "--plain", str(data), task,
                   str(rounds), str(n), str(phases)]  # fmt: skip
        wall = _timed(command, root / f"plain-{n}.log")
        results["plain"].append({"wall": wall, **json.loads(phases.read_text())})
    flower_result = root / "flower-app.json"
    command = [sys.executable, "-m", "tests.bench.flower_app", str(data), task, str(rounds),
               str(flower_result)]  # fmt: skip
    wall = _timed(command, root / "flower-app.log")
    flower = json.loads(flower_result.read_text())
    results["flower_app"] = {
        "wall": wall,
        "final_metric": flower["final_metric"],
        "steady_round": statistics.fmean(flower["rounds"][1:]),  # rounds 2..R
    }
    out = root / "medfed"
    command = [sys.executable, "-m", "medfed.server.cli", "simulate", "--task", task,
               "--data", str(data), "--rounds", str(rounds), "--out", str(out)]  # fmt: skip
    wall = _timed(command, root / "medfed.log")
    record = json.loads((out / "metrics.json").read_text())
    in_rounds = sum(r["seconds"] for r in record["rounds"])
    trained = [
        statistics.fmean(s["train-seconds"] for s in r["sites"].values())
        for r in record["rounds"][1:]
    ]
    results["medfed"] = {
        "wall": wall,
        "rounds": in_rounds,
        "round_0": record["rounds"][0]["seconds"],
        "outside_rounds": wall - in_rounds,
        "mean_site_training_per_round": statistics.fmean(trained),
        "steady_round": statistics.fmean(r["seconds"] for r in record["rounds"][2:]),
        "final_metric": record["rounds"][-1]["global"][_headline(task)],
    }
    return results


def _headline(task: str) -> str:
    from medfed.shared_models.tasks import TASKS

    return TASKS[task].headline_metric


def table(results: dict) -> str:
    """Whole runs (process start to exit) and the steady state (mean of rounds 2..R: one
    round of training and evaluation), each against the best plain setting."""
    best = min(results["plain"], key=lambda p: p["wall"])
    steady = min(p["steady_round"] for p in results["plain"])
    m = results["medfed"]
    lines = [
        "| run | wall s | × best plain | s/round, rounds 2..R | × best plain | fixed s "
        "(wall - R × s/round) | final metric |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rounds = results["rounds"]
    runs = [(f"plain loop, {p['threads']} thread(s)", p) for p in results["plain"]]
    runs += [("hand-written Flower app", results["flower_app"]), ("medfed simulate", m)]
    for label, run in runs:
        lines.append(
            f"| {label} | {run['wall']:.1f} | {run['wall'] / best['wall']:.2f} | "
            f"{run['steady_round']:.3f} | {run['steady_round'] / steady:.2f} | "
            f"{run['wall'] - rounds * run['steady_round']:.1f} | {run['final_metric']:.3f} |"
        )
    lines.append(
        f"\nmedfed: {m['outside_rounds']:.1f} s outside rounds, round 0 {m['round_0']:.2f} s, "
        f"site training {m['mean_site_training_per_round']:.2f} s per site and round; "
        + "; ".join(
            f"plain {p['threads']} thread(s): imports + data {p['imports_and_data']:.1f} s, "
            f"training {p['training']:.1f} s, evaluation {p['evaluation']:.1f} s"
            for p in results["plain"]
        )
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="segmentation")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plain", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        data, task, rounds, threads, out = args.plain
        Path(out).write_text(json.dumps(plain_loop(Path(data), task, int(rounds), int(threads))))
        return
    with tempfile.TemporaryDirectory() as folder:
        threads = [int(n) for n in args.threads.split(",")]
        results = measure(args.task, args.rounds, threads, Path(folder))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
