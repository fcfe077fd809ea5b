"""Deployed round latency: where a round's time goes between real processes over TLS.

`python -m tests.bench.deployed_round [--rounds 6] [--repeats 1] [--cases ...] [--out DIR]`
(`--rounds 0`: only each case's idle CPU per node)

A coordinator (SuperLink behind its proxy) and 3 hospital nodes (SuperNodes)
on 127.0.0.1, TLS and node authentication on, as tests/e2e/test_deployment.py
starts them. Each case runs a plain and a secure-aggregation run whose
training is near zero (32² images, 20 per site, the smallest U-Net, one
epoch), so a round is the federation's own latency. Cases:

- `flower-default`: Flower as it comes: a fresh ClientApp process per message
  (`--cold`), the SuperNode's fixed 3 s / 0.5 s waits (`--flower-waits`), the
  SuperExec looking for a new ClientApp task every 1 s, at most 2 message
  objects pulled or pushed at a time;
- `cold`: medfed's node before the warm worker: the SuperExec looks every
  `--task-poll` seconds, otherwise as `flower-default`;
- `warm`: ClientApp processes forked from the node's warm worker
  (client/warm_worker.py), Flower's waits, the SuperExec as in `cold`;
- `warm+waits`: and the SuperNode's and SuperExec's waits shortened while a run
  is active, Flower's when idle (client/supernode_runner.py);
- `warm+waits+pulls`: and a message object not there yet asked for again after
  0.1 s, not 1 s, by every process (shared_models/flower_pin.py): medfed's
  default. The cases before it run on a coordinator that keeps Flower's 1 s;
- `warm+waits+pulls+transfers`: and `--transfers` objects at a time (Flower marks
  these variables private: an internal setting, not a supported option).

`--simulated` also runs the same sites and settings in `medfed simulate`, in
the same invocation, for the deployed / simulated ratio. `--demo` takes the
demo's model and data (64² images, U-Net width 16, 2 local epochs) instead
of the smallest: a round that is mostly training.

Per round (rounds 2..N, steady state) the breakdown comes
from the coordinator's metrics.json `exchanges` (when each message went out,
when each reply was pulled) and the nodes' log lines, stamped with the time
they were written: per exchange and site, the SuperNode picking the message
up, downloading it, the ClientApp process starting, the ClientApp running
(imports, training, reply), the reply's upload and the coordinator pulling
it. Each case's figures are ratios against the other cases and mode measured
in the same invocation; `--repeats` alternates the cases.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from medfed.client.node import TASK_POLL_ENV
from medfed.client.supernode_runner import ACTIVE_SECONDS
from medfed.client.synthetic import generate_federation
from medfed.shared_models.flower_pin import FLOWER_PULLS_ENV
from tests.bench.runs import print_table, save_results
from tests.deployment import (
    REPO,
    Consortium,
    admit,
    closed_record,
    consortium,
    flwr,
    online,
    package_sha256,
    start_node,
    stop_all,
    tree,
    wait,
)

SITES = ["site-0", "site-1", "site-2"]
POLL_ENV = TASK_POLL_ENV  # flwr/supercore/superexec/run_superexec.py
TRANSFER_ENVS = ("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES")
FLOWER_DEFAULTS = {POLL_ENV: "1.0", **dict.fromkeys(TRANSFER_ENVS, "2")}  # Flower 1.42
# Sites whose counts are shown (floor 1 at the nodes and in the run): each trains on its own
# 16 images, not the public number of draws a site below its floor makes.
TINY = (
    "image-size=32 model-width=4 model-depth=2 batch-size=8 local-epochs=1 "
    "federated-stats=false min-nodes=3 node-wait-seconds=60.0 stats-min-count=1"
)
# `--demo`: the demo's model and data (medfed simulate's defaults: 64² images, U-Net
# width 16, 2 local epochs), so that a round is mostly training.
DEMO = "federated-stats=false min-nodes=3 node-wait-seconds=60.0 stats-min-count=1"
SHOWN_SITES = ("--min-count", "1")
SEEDS = itertools.count(1)
MODES = {"plain": "", "secure": "secure-aggregation=true"}
IDLE_SECONDS = 30.0
# Where one site's answer to one message spends its time, in order (see `site_segments`).
SEGMENTS = {
    "pick-up": "SuperNode picks the message up (3 s sleep when idle)",
    "download": "message download",
    "process-start": "SuperExec poll + ClientApp process start (beyond the download)",
    "clientapp": "ClientApp: imports, handler, reply (+ node's 0.5 s reply poll)",
    "upload": "reply upload",
    "notice": "coordinator pulls the reply (medfed's polls + its download)",
}
EXTRA = {
    "slowest": "waiting for the slowest site",
    "coordinator": "coordinator between exchanges (checks, aggregation)",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EVENTS = {
    "receiving": re.compile(r"Receiving: (\S+) message"),
    "received": re.compile(r"Received successfully"),
    "started": re.compile(r"Start `flwr-clientapp` process"),
    "sending": re.compile(r"Sending: (\S+) message"),
    "sent": re.compile(r"Sent successfully"),
}
Event = tuple[float, str, str]  # (Unix time, event, message type)


def node_events(log: Path) -> list[Event]:
    """The SuperNode's and its ClientApps' message events, from a stamped log."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, text = line.partition(" ")
        text = ANSI.sub("", text)
        for what, pattern in EVENTS.items():
            if found := pattern.search(text):
                events.append((float(stamp), what, found.group(1) if found.groups() else ""))
    return events


def _first(events: list[Event], what: str, after: float, kind: str = "") -> float | None:
    return next((t for t, w, k in events if w == what and t >= after and k == kind), None)


def site_segments(
    events: list[Event], message: str, sent_at: float, seconds: float
) -> dict[str, float] | None:
    """One site's answer to one message, split at its log events (None: not in the log).

    They add up to `seconds`, the time from the push until the coordinator
    pulled the reply. The SuperExec may start the ClientApp process while the
    SuperNode is still downloading the message (the task exists before its
    content): the process start counts only for what it adds after the download.
    """
    picked = _first(events, "receiving", sent_at, message)
    received = _first(events, "received", picked) if picked else None
    started = _first(events, "started", picked) if picked else None
    if picked is None or received is None or started is None:
        return None
    ready = max(received, started)
    sending = _first(events, "sending", ready, message)
    sent = _first(events, "sent", sending) if sending else None
    if sending is None or sent is None:
        return None
    return {
        "pick-up": picked - sent_at,
        "download": received - picked,
        "process-start": ready - received,
        "clientapp": sending - ready,
        "upload": sent - sending,
        "notice": sent_at + seconds - sent,
    }


def round_breakdown(entry: dict[str, Any], events: dict[str, list[Event]]) -> dict[str, float]:
    """Seconds of one round by segment (site means per exchange, summed over its exchanges);
    with `slowest` and `coordinator` they add up to the round's seconds."""
    totals: dict[str, float] = defaultdict(float)
    waited = 0.0
    for exchange in entry["exchanges"]:
        replies = exchange["replies"]
        parts = [
            site_segments(events[site], exchange["message"], exchange["sent-at"], seconds)
            for site, seconds in replies.items()
        ]
        if None in parts or not parts:
            raise SystemExit(f"{exchange['message']} at {exchange['sent-at']}: not in node logs")
        for key in SEGMENTS:
            totals[key] += statistics.fmean(p[key] for p in parts if p)
        totals["slowest"] += exchange["seconds"] - statistics.fmean(replies.values())
        waited += exchange["seconds"]
    totals["coordinator"] = entry["seconds"] - waited
    trained = [s["train-seconds"] for s in entry["sites"].values() if "train-seconds" in s]
    totals["training"] = statistics.fmean(trained) if trained else 0.0
    totals["exchanges"] = len(entry["exchanges"])
    return dict(totals)


def analyse(metrics: dict[str, Any], events: dict[str, list[Event]]) -> dict[str, Any]:
    """Steady-state seconds per round (rounds 2..N) and their mean breakdown."""
    rounds = metrics["rounds"]
    steady = [r for r in rounds if r["round"] >= 2]
    seconds = [r["seconds"] for r in steady]
    parts = [round_breakdown(r, events) for r in steady]
    starts = {r["round"]: r["exchanges"][0]["sent-at"] for r in rounds}
    between = [starts[r["round"] + 1] - starts[r["round"]] - r["seconds"]
               for r in steady if r["round"] + 1 in starts]  # fmt: skip
    return {
        "status": metrics["status"],
        "rounds": [r["seconds"] for r in rounds],
        "mean": statistics.fmean(seconds),
        "median": statistics.median(seconds),
        "breakdown": {key: statistics.fmean(p[key] for p in parts) for key in parts[0]},
        "between-rounds": statistics.fmean(between) if between else 0.0,
    }


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds the live `pids` have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def idle_cpu(nodes: list[subprocess.Popen], seconds: float) -> float:
    """CPU share of one core an idle node uses (SuperNode and SuperExec polling, the warm
    worker waiting), measured once its last ClientApp processes ended, its warm worker is
    ready and a minute without messages has passed (medfed's waits are short for a minute
    after the last message: supernode_runner.ACTIVE_SECONDS)."""
    time.sleep(ACTIVE_SECONDS + 5.0)
    pids = set().union(*(tree(node.pid) for node in nodes))
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds / len(nodes)


def import_seconds() -> float:
    """Median of 3 fresh processes importing what a training ClientApp imports."""
    code = "import medfed.client.app, medfed.client.handlers"
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_quietly(c: Consortium, config: str) -> tuple[str, dict[str, Any]]:
    """`flwr run` with `config`; its id and metrics.json once the run's record is closed.

    It waits on the record, not on `flwr ls`: a `flwr` process a second would
    take CPU from the processes this benchmark times, on a 2-core machine.
    """
    run_id = str(flwr(c["env"], "run", str(REPO), "consortium", "--run-config", config)["run-id"])
    wait(lambda: closed_record(c, run_id) is not None, 900, f"run {run_id}")
    return run_id, closed_record(c, run_id) or {}


def run_case(c: Consortium, label: str, case: Case, rounds: int, threads: int) -> dict[str, Any]:
    """Start the nodes with the case's environment and options, run each mode, stop the
    nodes; their logs are kept as SITE-LABEL.log. Each node's torch uses `threads` threads,
    as each simulated site gets one CPU from Ray (which sets OMP_NUM_THREADS to it): three
    nodes of two threads each on two cores spent most of their training waiting on each
    other's threads."""
    settings, options, _ = case
    env = {**c["env"], **settings, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    nodes = [
        start_node(c, s, c["sites"] / s, env=env, stamped=True, options=(*SHOWN_SITES, *options))
        for s in SITES
    ]
    try:
        wait(lambda: len(online(c)) == len(SITES), 120, "three hospitals online")
        results: dict[str, Any] = {"settings": settings, "options": list(options)}
        for mode, extra in MODES.items() if rounds else []:
            # each run from another initial model: a hospital helps unmask one sum per model,
            # across runs (its node-wide ledger), and the nodes keep their state between cases
            seed = next(SEEDS)
            run_id, metrics = run_quietly(
                c, f"num-server-rounds={rounds} seed={seed} {c['run-settings']} {extra}"
            )
            if metrics["status"] != "completed":
                raise SystemExit(f"{label} {mode}: run {metrics['status']}: {metrics.get('error')}")
            events = {site: node_events(c["tmp"] / f"{site}.log") for site in SITES}
            results[mode] = {"run-id": run_id, **analyse(metrics, events)}
            print(f"{label} {mode}: {results[mode]['mean']:.2f} s/round", flush=True)
        results["idle-cpu-per-node"] = idle_cpu(nodes, IDLE_SECONDS)
        results["node-memory-mib"] = node_memory(nodes)
        return results
    finally:
        stop_all(nodes)
        wait(lambda: not online(c), 120, "the nodes to leave")
        for site in SITES:
            (c["tmp"] / f"{site}.log").rename(c["tmp"] / f"{site}-{label}.log")


# (the nodes' environment, node start options, whether every process pulls a message's
# objects with medfed's short retries: the coordinator's too)
Case = tuple[dict[str, str], tuple[str, ...], bool]
COLD = ("--cold", "--flower-waits")
FLOWER_PULLS = {FLOWER_PULLS_ENV: "1"}


def cases(poll: str, transfers: str) -> dict[str, Case]:
    """Each case's Flower settings in the nodes' environment and its node options."""
    tuned = {**FLOWER_DEFAULTS, POLL_ENV: poll}
    return {
        "flower-default": (FLOWER_DEFAULTS, COLD, False),
        "cold": (tuned, COLD, False),
        "warm": (tuned, ("--flower-waits",), False),
        # Flower's interval when idle; medfed's SuperExec polls every 0.1 s while active
        "warm+waits": ({**FLOWER_DEFAULTS, **FLOWER_PULLS}, (), False),
        "warm+waits+pulls": (FLOWER_DEFAULTS, (), True),
        "warm+waits+pulls+transfers": (
            {**FLOWER_DEFAULTS, **dict.fromkeys(TRANSFER_ENVS, transfers)},
            (),
            True,
        ),
    }


def node_memory(nodes: list[subprocess.Popen]) -> dict[str, float]:
    """Resident memory per node (MiB): its whole process tree, and its warm worker alone."""
    trees = [tree(node.pid) for node in nodes]
    workers = [
        pid for pids in trees for pid in pids if "warm_worker" in _command_line(pid)
    ]  # fmt: skip
    return {
        "tree": statistics.fmean(sum(_rss_mib(p) for p in pids) for pids in trees),
        "worker": statistics.fmean(_rss_mib(p) for p in workers) if workers else 0.0,
    }


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def simulated(sites: Path, work: Path, rounds: int, run_settings: str) -> dict[str, Any]:
    """The same sites and settings in `medfed simulate`: steady seconds per round per mode."""
    results = {}
    for mode, extra in MODES.items():
        out = work / f"simulated-{mode}"
        overrides = [f"-c{kv}" for kv in f"{run_settings} {extra}".split()]
        command = [sys.executable, "-m", "medfed.server.cli", "simulate", "--data", str(sites),
                   "--rounds", str(rounds), "--out", str(out), *overrides]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        metrics = json.loads((out / "metrics.json").read_text())
        steady = [r["seconds"] for r in metrics["rounds"] if r["round"] >= 2]
        results[mode] = {"mean": statistics.fmean(steady), "median": statistics.median(steady)}
        print(f"simulated {mode}: {results[mode]['mean']:.2f} s/round", flush=True)
    return results


def measure(work: Path, rounds: int, settings: dict[str, Case], args: argparse.Namespace) -> dict:
    """Every case, `repeats` times in turn, on one coordinator (and the simulated rounds)."""
    sites = work / "sites"
    run_settings = DEMO if args.demo else TINY
    size = {} if args.demo else {"images_per_site": 20, "image_size": 32}
    generate_federation("segmentation", 3, sites, seed=1, **size)
    results: dict[str, Any] = {
        "cases": defaultdict(list),
        "node-threads": args.node_threads,
        "run-settings": run_settings,
    }
    for pulls in sorted({shortened for _, _, shortened in settings.values()}):
        # a coordinator per pull setting: its ServerApp pulls every reply
        folder = work / ("medfed-pulls" if pulls else "flower-pulls")
        with consortium(folder, sites, SITES, {} if pulls else FLOWER_PULLS) as c:
            c["app_sha256"] = package_sha256(REPO, folder / "build")
            c["run-settings"] = run_settings
            for site in SITES:
                admit(c, site)
            for repeat in range(1, args.repeats + 1):
                for case, setting in settings.items():
                    if setting[2] == pulls:
                        label = f"{case}-{repeat}"
                        result = run_case(c, label, setting, rounds, args.node_threads)
                        results["cases"][case].append(result)
    if args.simulated and rounds:
        results["simulated"] = simulated(sites, work, rounds, run_settings)
    results["clientapp-import-seconds"] = import_seconds()
    return results


def _cell(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def report(results: dict[str, Any]) -> None:
    """The before/after table (each cell: one value per repeat) and the ratios."""
    by_case = results["cases"]
    if not all(mode in r for mode in MODES for rs in by_case.values() for r in rs):
        idle_report(results)
        return
    columns = {"seconds per round": 66}
    names = [f"{mode} {case}" for mode in MODES for case in by_case]
    columns.update({name: max(len(name), 14) for name in names})
    keys = [("mean", "s/round, mean (rounds 2..N)"), ("median", "s/round, median")]
    keys += [(k, f"  {label}") for k, label in {**SEGMENTS, **EXTRA}.items()]
    keys += [("training", "    of the ClientApp: training (train-seconds)")]
    keys += [("between-rounds", "between rounds (records, checkpoint; not in s/round)")]
    rows = []
    for key, label in keys:
        row = [label]
        for mode in MODES:
            for case in by_case:
                row.append(_cell([_value(r[mode], key) for r in by_case[case]]))
        rows.append(row)
    print_table(columns, rows)
    default = by_case.get("flower-default", [])
    for case, tuned in by_case.items():
        for mode in MODES if default and case != "flower-default" else []:
            ratio = [t[mode]["mean"] / d[mode]["mean"] for d, t in zip(default, tuned, strict=True)]
            print(f"{mode}: {case} / flower-default = {_cell(ratio)}")
    for case in by_case:
        ratio = [r["secure"]["mean"] / r["plain"]["mean"] for r in by_case[case]]
        print(f"{case}: secure / plain = {_cell(ratio)}")
    for mode, sim in results.get("simulated", {}).items():
        for case in by_case:
            ratio = [r[mode]["mean"] / sim["mean"] for r in by_case[case]]
            print(f"{mode}: {case} / simulated ({sim['mean']:.2f} s) = {_cell(ratio)}")
    idle_report(results)


def idle_report(results: dict[str, Any]) -> None:
    """Each case's idle CPU per node and what a ClientApp process imports."""
    for case, repeats in results["cases"].items():
        cpu = [100 * r["idle-cpu-per-node"] for r in repeats]
        tree_mib = [r["node-memory-mib"]["tree"] for r in repeats]
        worker_mib = [r["node-memory-mib"]["worker"] for r in repeats]
        print(
            f"{case}: idle node CPU = {_cell(cpu)} % of one core; resident memory per node "
            f"{_cell(tree_mib)} MiB, of which the warm worker {_cell(worker_mib)} MiB"
        )
    imports = results["clientapp-import-seconds"]
    print(f"a fresh process importing a training ClientApp: {imports:.2f} s")


def _value(result: dict[str, Any], key: str) -> float:
    return result[key] if key in ("mean", "median", "between-rounds") else result["breakdown"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds per run (steady: 2..N; 0: idle CPU only)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternate the cases this often")
    parser.add_argument("--task-poll", default="0.1", help=f"{POLL_ENV} of the cold and warm cases")
    parser.add_argument("--transfers", default="8", help="concurrent object pulls and pushes")
    parser.add_argument("--cases", nargs="+", default=list(cases("", "")), help="which cases")
    parser.add_argument(
        "--simulated", action="store_true", help="also the same rounds in medfed simulate"
    )
    parser.add_argument(
        "--node-threads",
        type=int,
        default=1,
        help="torch threads per node (Ray gives a simulated site 1 CPU)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="the demo's model and data instead of the smallest: a round that is mostly training",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-deployed-round"))
    parser.add_argument("--keep", action="store_true", help="keep the logs and runs in OUT/work")
    args = parser.parse_args()
    settings = {k: v for k, v in cases(args.task_poll, args.transfers).items() if k in args.cases}
    if args.keep:
        results = measure((args.out / "work").resolve(), args.rounds, settings, args)
    else:
        with tempfile.TemporaryDirectory(prefix="medfed-round-") as work:
            results = measure(Path(work), args.rounds, settings, args)
    report(results)
    print(f"results: {save_results(args.out, 'deployed_round.json', results)}")


if __name__ == "__main__":
    main()
