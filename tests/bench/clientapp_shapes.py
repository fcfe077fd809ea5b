"""A warm ClientApp in two shapes: a process forked per message, or one process per run.

`python -m tests.bench.clientapp_shapes [--messages 8] [--out DIR]`

Issue 24 names two shapes for a hospital's warm ClientApp: each message's
process forked from a worker that imported torch, MONAI and medfed once (what
`medfed node start` runs: client/warm_worker.py), or one process per run that
keeps the installed app package, the opened site and torch's first-use state
across the run's messages (NVIDIA FLARE's job process). Flower's transfers
(the message pulled from the SuperNode, the reply pushed to it) are the same
in both shapes and left out: this measures the part of a message that differs.

Both shapes start from a parent that imported what the warm worker imports
(`warm_worker.preload`). Every message is a training message of the deployed
benchmark's size (32² images, 20 at the site, the smallest U-Net, one epoch,
the received model validated first) handled in-process by medfed's ClientApp,
mods and handler as deployed; the app package is checked against the node's
approvals and installed as Flower's ClientApp process does.

- `fork`: per message, a fork whose child checks and installs the package,
  handles the message and exits; timed by the parent from the fork to the
  child's end;
- `per-run`: one child checks and installs the package once, then handles
  every message; each timed alone (the first includes the install).

Messages 2..N are the steady state; the ratio is per-run / fork in one
invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.cli.install import install_from_fab

from medfed.client import approval, warm_worker
from medfed.client.app import app
from medfed.client.synthetic import generate_federation
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, NodeConfig
from tests.bench.runs import print_table, save_results
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.deployment import REPO, package_sha256

RUN_CONFIG = {
    "task": "segmentation",
    "image-size": 32,
    "model-width": 4,
    "model-depth": 2,
    "batch-size": 8,
    "local-epochs": 1,
    "stats-min-count": 1,
}


class Site:
    """One hospital's site, node config, approved app package and run context."""

    def __init__(self, work: Path) -> None:
        sites = work / "sites"
        in_child(lambda: generate_federation("segmentation", 1, sites, seed=1,
                                             images_per_site=20, image_size=32))  # fmt: skip
        self.node = {
            NodeConfig.DATA_PATH: str(sites / "site-0"),
            NodeConfig.CACHE_DIR: str(work / "cache"),
            NodeConfig.MIN_COUNT: 1,
        }
        digest = package_sha256(REPO, work / "build")
        self.fab = next((work / "build").glob("*.fab")).read_bytes()
        approval.approve(work / "state", digest)
        os.environ[approval.STATE_ENV] = str(work / "state")
        os.environ["FLWR_HOME"] = str(work / "flwr")

    def install(self) -> None:
        """What Flower's ClientApp process does with the package, medfed's check first."""
        approval.check(self.fab)
        install_from_fab(self.fab, skip_prompt=True)

    def handle(self, server_round: int, model: dict[str, np.ndarray]) -> None:
        """One training message of round `server_round`, handled as deployed."""
        run_config = RunConfig.from_mapping(RUN_CONFIG).to_mapping()
        context = Context(RUN_ID, 5, self.node, RecordDict(), run_config)
        reply = app(incoming("train", {Config.SERVER_ROUND: server_round}, model), context)
        if reply.has_error():
            raise SystemExit(f"round {server_round}: {reply.error.reason}")


def in_child(work: Callable[[], Any]) -> Any:
    """`work()`'s result, computed in a forked child: the parent, like the warm worker,
    never runs tensor work (its children would inherit torch's OpenMP pool, which a fork
    leaves locked)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        with os.fdopen(write, "wb") as out:
            pickle.dump(work(), out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        found = pickle.load(answer)
    os.waitpid(pid, 0)
    return found


def models(count: int) -> list[dict[str, np.ndarray]]:
    """`count` different global models (a hospital trains once per model)."""
    import torch

    from medfed.shared_models.tasks import TASKS

    cfg = RunConfig.from_mapping(RUN_CONFIG)
    found = []
    for seed in range(count):
        torch.manual_seed(seed)
        net = TASKS["segmentation"].build_network(cfg)
        found.append({k: v.numpy().copy() for k, v in net.state_dict().items()})
    return found


def forked(site: Site, messages: list[dict[str, np.ndarray]], first_round: int) -> list[float]:
    """Each message in a child forked for it: seconds from the fork to the child's end."""
    seconds = []
    for offset, model in enumerate(messages):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                site.install()
                site.handle(first_round + offset, model)
            except BaseException as error:  # reported by the parent as a failed child
                print(f"fork child: {error}", file=sys.stderr)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("a forked message failed")
        seconds.append(time.perf_counter() - start)
    return seconds


def per_run(site: Site, messages: list[dict[str, np.ndarray]], first_round: int) -> list[float]:
    """Every message in one child that installed the package once; each timed alone."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        seconds = []
        code = 0
        try:
            for offset, model in enumerate(messages):
                start = time.perf_counter()
                if offset == 0:
                    site.install()
                site.handle(first_round + offset, model)
                seconds.append(time.perf_counter() - start)
            os.write(write, json.dumps(seconds).encode())
        except BaseException as error:
            print(f"per-run child: {error}", file=sys.stderr)
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("the per-run process failed")
    return json.loads(text)


def measure(work: Path, count: int) -> dict[str, Any]:
    """Both shapes on one site: each its own rounds and models (a hospital trains each round
    and each model once), the shapes alternated twice."""
    site = Site(work)
    warm_worker.preload()
    all_models = in_child(lambda: models(4 * count))
    results: dict[str, list[list[float]]] = {"fork": [], "per-run": []}
    for repeat in range(2):
        for index, (shape, run) in enumerate((("fork", forked), ("per-run", per_run))):
            block = 2 * repeat + index
            batch = all_models[block * count : (block + 1) * count]
            results[shape].append(run(site, batch, 2 + block * count))
            print(f"{shape}, repeat {repeat + 1}: {_steady(results[shape][-1]):.3f} s", flush=True)
    return results


def _steady(seconds: list[float]) -> float:
    return statistics.fmean(seconds[1:])


def report(results: dict[str, list[list[float]]]) -> None:
    """Seconds per message by shape and repeat, and the ratio."""
    columns = {"seconds per message": 34, "fork": 16, "per-run": 16}
    rows = []
    for label, pick in (
        ("first message", lambda s: s[0]),
        ("messages 2..N, mean", _steady),
        ("messages 2..N, median", lambda s: statistics.median(s[1:])),
    ):
        rows.append([label, *(" / ".join(f"{pick(s):.3f}" for s in results[k]) for k in columns
                              if k in results)])  # fmt: skip
    print_table(columns, rows)
    ratios = [_steady(p) / _steady(f) for f, p in zip(results["fork"], results["per-run"],
                                                        strict=True)]  # fmt: skip
    print("per-run / fork (messages 2..N) = " + " / ".join(f"{r:.2f}" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=8, help="messages per shape and repeat")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-clientapp-shapes"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-shapes-") as work:
        results = measure(Path(work), args.messages)
    report(results)
    print(f"results: {save_results(args.out, 'clientapp_shapes.json', results)}")


if __name__ == "__main__":
    main()
