"""`medfed bench quality`: pooled vs local vs federated on the same sites, seeds and budget.

A consortium federates on evidence: does the federated model come close to one
trained on pooled data, and does it beat what each hospital trains alone? With
the same data, seeds, learning rate and total epochs (rounds x local epochs),
this trains every method and scores each on every site's validation split:

- pooled: every site's training split in one loop (the upper reference);
- local: each site alone, scored on its own and on every other site's split;
- federated: FedAvg, FedProx, FedAdam, FedBN and FedAvg with secure
  aggregation, without and with DP noise (added by the coordinator, or by the
  hospitals inside the masked sum), each a real `medfed simulate` run.

Each run keeps its folder under OUT/runs, so a bench stopped or failed half-way
carries on where it stopped when started again with the same --out.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medfed.server.bench.quality_table import QualityResults, write_outputs
from medfed.server.simulation.simulate import (
    Simulation,
    classes_from_sites,
    site_declarations,
    task_from_sites,
)
from medfed.server.simulation.simulate import run as simulate
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.config import NORM_CONFIGURABLE, ConfigError, RunConfig
from medfed.shared_models.protocol import SECAGG_MIN_PARTICIPANTS
from medfed.shared_models.run_folder import METRICS_JSON
from medfed.shared_models.tasks import TASKS

FEDERATED = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    # Flower's default eta (0.1) moves every weight by ~0.1 a round: it diverges here
    "fedadam": {"strategy": "fedadam", "server-lr": 0.01},
    "fedbn": {"strategy": "fedbn"},
    "fedavg-secure": {"strategy": "fedavg", "secure-aggregation": True},
}
# Where DP noise is added, compared at one noise level small enough to train on three
# hospitals (the sum's noise is the same by construction: any difference is the price of
# adding it before encoding). Not a recommended privacy setting (docs/security.md).
SECURE_DP = {
    "strategy": "fedavg",
    "secure-aggregation": True,
    "dp.mode": "client",
    "dp.noise-multiplier": 0.01,
    "dp.clipping-norm": 1.0,
}
FEDERATED |= {
    "fedavg-secure-dp": {**SECURE_DP, "dp.noise": "coordinator"},
    "fedavg-secure-dp-hospitals": {**SECURE_DP, "dp.noise": "hospitals"},
}
METHODS = ("pooled", "local", *FEDERATED)
BENCH_TASKS = ("segmentation", "segmentation3d", "classification", "regression")
RESULT_JSON = "result.json"
TIME = "%Y-%m-%dT%H:%M:%S%z"  # metrics.json's started / finished
# What each method sets itself: -c may not change them.
SET_BY_THE_BENCH = ("task", "strategy", "secure-aggregation", "num-server-rounds", "seed",
                    "data-root", "out-dir", "resume-from")  # fmt: skip


@dataclass(frozen=True)
class Hospitals:
    """The hospital-side pieces the bench drives. The command line wires them in: the
    coordinator's modules never import the hospital's (docs/architecture.md)."""

    generate: Callable[..., list[Path]]  # client.synthetic.generate_federation
    folders: Callable[[Path], list[Path]]  # client.data.site_paths.site_folders
    # client.local_training.train_and_evaluate(train_on, evaluate_on, cfg, epochs)
    train_and_evaluate: Callable[[list[Path], list[Path], RunConfig, int], dict]


@dataclass(frozen=True)
class QualityBench:
    """One `medfed bench quality` call; with --data and no --task, the task is the one the
    sites' dataset.json declare."""

    task: str | None
    out: Path
    sites: int = 3
    rounds: int = 10
    seeds: int = 3
    data: Path | None = None
    images_per_site: int | None = None
    methods: tuple[str, ...] = METHODS
    overrides: dict[str, Any] = field(default_factory=dict)


def run_bench(bench: QualityBench, hospitals: Hospitals) -> int:
    """Every method for every seed; 0 when all completed (the table is written either way)."""
    _check(bench)
    sites = _site_folders(bench, hospitals)
    base = _base(bench, sites)
    jobs = [(method, seed) for seed in range(bench.seeds) for method in bench.methods]
    first = _config(bench, base, sites[0].parent, 0, bench.methods[0])  # all share the classes
    results = QualityResults(first.task, [p.name for p in sites], base, classes=list(first.classes))
    with tqdm(total=len(jobs), desc="quality bench", unit="run") as bar:
        for method, seed in jobs:
            bar.set_postfix_str(f"{method} seed {seed}")
            cfg = _config(bench, base, sites[0].parent, seed, method)
            started = time.monotonic()
            outcome = _run_once(bench, hospitals, sites, method, cfg)
            outcome.setdefault("seconds", round(time.monotonic() - started, 1))
            results.add(method, seed, outcome)
            if outcome.get("status") != "completed":
                bar.write(f"{method} seed {seed}: {outcome.get('error', 'failed')}")
            bar.update()
    for path in write_outputs(results, bench.out):
        print(f"wrote {path}")
    print(results.markdown())
    return 0 if results.complete() else 1


def _check(bench: QualityBench) -> None:
    if bench.task is None and bench.data is None:
        raise ConfigError("--task: needed without --data (synthetic hospitals are made for it)")
    if bench.task is not None and bench.task not in BENCH_TASKS:
        raise ConfigError(f"--task {bench.task}: the quality bench covers {', '.join(BENCH_TASKS)}")
    unknown = [m for m in bench.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {','.join(unknown)}: expected some of {','.join(METHODS)}")
    fixed = [key for key in bench.overrides if key in SET_BY_THE_BENCH]
    if fixed:
        raise ConfigError(f"-c {fixed[0]}: set by the bench itself (--task, --rounds, each method)")
    if not 1 <= bench.seeds <= 100:
        raise ConfigError(f"--seeds {bench.seeds}: expected 1..100")
    if bench.sites < 2:
        raise ConfigError(f"--sites {bench.sites}: a federation needs at least 2 hospitals")
    secure = [m for m in bench.methods if FEDERATED.get(m, {}).get("secure-aggregation")]
    if secure and bench.sites < SECAGG_MIN_PARTICIPANTS:
        raise ConfigError(
            f"--sites {bench.sites}: {secure[0]} needs at least {SECAGG_MIN_PARTICIPANTS} "
            "hospitals (with fewer, one learns another's update from the sum); leave it out "
            "of --methods"
        )


def _site_folders(bench: QualityBench, hospitals: Hospitals) -> list[Path]:
    """The sites of --data, or a synthetic non-IID federation generated once under OUT/data."""
    if bench.data is not None:
        found = hospitals.folders(bench.data.expanduser().resolve())
        if len(found) < bench.sites:
            raise ConfigError(
                f"--data {bench.data}: {len(found)} site folders, --sites {bench.sites}"
            )
        return found[: bench.sites]
    data = bench.out.resolve() / "data"
    if not data.is_dir():
        print(f"generating {bench.sites} synthetic hospitals ({bench.task}) in {data}")
        hospitals.generate(bench.task, bench.sites, data, images_per_site=bench.images_per_site)
    return hospitals.folders(data)[: bench.sites]


def _base(bench: QualityBench, sites: list[Path]) -> dict[str, Any]:
    """Settings every method shares: with --data, the task and classes the sites declare
    where the command line names none, as `medfed simulate --data` takes them. The same
    network for all: batch norm where the network lets one choose, since FedBN needs
    normalisation layers to keep local."""
    values: dict[str, Any] = {
        "num-server-rounds": bench.rounds,
        "min-nodes": bench.sites,  # every hospital in every round: the same budget as pooled
        "federated-stats": False,
        # synthetic hospitals are not patients: every site's metric is compared, none hidden
        # below the floor (with --data the sites' floor stands unless -c sets it)
        **({"stats-min-count": 1} if bench.data is None else {}),
        **bench.overrides,
        "task": bench.task,
    }
    declared = site_declarations(sites)
    if bench.data is not None:
        values = task_from_sites(values, declared)
    if values["task"] is None:
        raise ConfigError(
            f"--task: the sites' dataset.json under {bench.data} name none; pass "
            f"--task {'|'.join(BENCH_TASKS)}"
        )
    if values["task"] not in BENCH_TASKS:
        raise ConfigError(
            f"task {values['task']} (the sites' dataset.json): the quality bench covers "
            f"{', '.join(BENCH_TASKS)}; pass another --task"
        )
    if bench.data is not None:
        values = classes_from_sites(values, declared)
    model = values.get("model") or TASKS[values["task"]].models[0]
    if model in NORM_CONFIGURABLE:
        values.setdefault("norm", "batch")
    return values


def _config(
    bench: QualityBench, base: dict[str, Any], data: Path, seed: int, method: str
) -> RunConfig:
    """The method's settings over `base` (from `_base`); what -c sets (e.g. server-lr) wins
    over the method's defaults."""
    own = {k: v for k, v in FEDERATED.get(method, {}).items() if k not in bench.overrides}
    values = {**base, **own, "seed": seed, "data-root": str(data)}
    return RunConfig.from_mapping(values)


def _run_once(
    bench: QualityBench, hospitals: Hospitals, sites: list[Path], method: str, cfg: RunConfig
) -> dict[str, Any]:
    """One method at one seed: its per-site metrics, reused from its folder when done."""
    folder = bench.out.resolve() / "runs" / f"{method}-seed{cfg.seed}"
    if method in FEDERATED:
        return _federated(folder, cfg, len(sites))
    done = folder / RESULT_JSON
    if done.is_file():
        return json.loads(done.read_text())
    epochs = cfg.num_server_rounds * cfg.local_epochs  # the federation's total local epochs
    started = time.monotonic()
    if method == "pooled":
        outcome: dict[str, Any] = {"sites": hospitals.train_and_evaluate(sites, sites, cfg, epochs)}
    else:
        cross = {p.name: hospitals.train_and_evaluate([p], sites, cfg, epochs) for p in sites}
        outcome = {"sites": {name: cross[name][name] for name in cross}, "cross": cross}
    outcome.update(status="completed", seconds=round(time.monotonic() - started, 1))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(done, json.dumps(outcome, indent=1).encode())
    return outcome


def _same_settings(folder: Path, recorded: dict[str, Any], cfg: RunConfig) -> None:
    """ConfigError unless the finished run in `folder` used this bench's settings."""
    then = RunConfig.from_mapping(recorded).to_mapping()
    now = cfg.to_mapping()
    differing = sorted(k for k in now if k != "out-dir" and now[k] != then.get(k))
    if differing:
        shown = ", ".join(f"{k} = {then.get(k)!r} there, {now[k]!r} here" for k in differing)
        raise ConfigError(f"{folder} holds a run with other settings ({shown}): use another --out")


def _federated(folder: Path, cfg: RunConfig, sites: int) -> dict[str, Any]:
    """A real `medfed simulate` run; its last round's per-site evaluation."""
    metrics_path = folder / METRICS_JSON
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text())
        if recorded["status"] != "completed":
            shutil.rmtree(folder)  # an earlier bench stopped inside this run: run it again
        else:
            _same_settings(folder, recorded["config"], cfg)
    if not metrics_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = Path(cfg.data_root)
        sim = Simulation(overrides=cfg.to_mapping(), sites=sites, out=folder, data=data)
        with (folder / "bench.log").open("a") as log, redirect_stdout(log), redirect_stderr(log):
            try:
                simulate(sim)
            except Exception as err:  # one failed method must not lose the others
                print(f"failed: {err}")
                return {"status": "failed", "error": str(err)}
    result = json.loads(metrics_path.read_text())
    if result["status"] != "completed":
        return {"status": result["status"], "error": result.get("error", "see its folder")}
    last = result["rounds"][-1]
    rounds = sum(r.get("seconds", 0.0) for r in result["rounds"])
    ran = datetime.strptime(result["finished"], TIME) - datetime.strptime(result["started"], TIME)
    return {
        "status": "completed",
        "sites": last["sites"],
        "seconds": round(ran.total_seconds(), 1),  # the ServerApp's run, as the record says
        "round-seconds": round(rounds, 1),
    }
