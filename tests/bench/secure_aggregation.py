"""Round time and peak memory: plain FedAvg vs medfed's SecAgg+ vs Flower's legacy SecAgg+.

    python -m tests.bench.secure_aggregation [--models 7m,60m] [--clients 4,8] [--rounds 5]
    python -m tests.bench.secure_aggregation --with-training [--rounds 4]

Every case is the same simulated federation (Flower's simulation engine, Ray,
one CPU per hospital) in a fresh process, timed over rounds 2..R (the steady
state: round 1 also starts the workers) and, as the issue measured, over
rounds 1-2. Hospitals do no training (they return the received weights scaled
by 1.0001), so the round time is the cost of the federation itself: messages,
masking, aggregation. Each secure mode is compared with the plain path of its
own API: medfed's SecAgg+ with medfed's plain exchange, Flower's SecAgg+
(`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`) with Flower's
`DefaultWorkflow()`, so the legacy API's own cost is not charged to secure
aggregation. Memory is the peak PSS of the case's process tree (Ray's workers
included; tests/bench/memory.py). Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from tests.bench.memory import GIB, PeakTreeMemory

MODELS = {"7m": "DenseNet121 (2D)", "60m": "ResNet-152 (2D)"}
# flower-plain: FedAvg over Flower's Grid.send_and_receive (it sleeps 0.1 s between
# pulls in simulation); plain: the same over medfed's exchange (polls from 5 ms up),
# which medfed's rounds use; medfed: SecAgg+; flower-legacy: Flower's legacy API
# (DefaultWorkflow, strategy callbacks), plain; flower: the same with SecAggPlusWorkflow;
# plain+exchange: plain, then one empty message to every hospital and its reply: the
# floor of any protocol that needs a second exchange per round (SecAgg+'s unmask).
MODES = ("flower-plain", "plain", "flower-legacy", "medfed", "flower", "plain+exchange")


def model_arrays(name: str) -> dict[str, np.ndarray]:
    from monai.networks.nets import DenseNet121, resnet152

    if name == "7m":
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    else:
        net = resnet152(spatial_dims=2, n_input_channels=1, num_classes=3)
    return {
        k: v.detach().numpy().copy() for k, v in net.state_dict().items() if v.is_floating_point()
    }


def run_case(mode: str, model: str, clients: int, rounds: int, result_path: Path) -> None:
    """One federation in this process; per-round seconds go to `result_path`."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    start = model_arrays(model)
    apps = {
        "flower-plain": _flower_plain,
        "plain": _plain,
        "flower-legacy": partial(_flower, secure=False),
        "medfed": _medfed,
        "flower": _flower,
        "plain+exchange": _plain_and_exchange,
    }
    server, client = apps[mode](start, clients, rounds, result_path)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def _wait(grid, clients: int) -> None:
    while len(list(grid.get_node_ids())) < clients:
        time.sleep(0.2)


def _message_api_apps(
    start, clients, rounds, result_path, secure: bool, flower_polls=False, second=False
):
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    from medfed.client.privacy import secagg_mod
    from medfed.server.run.exchange import Exchange, send_and_receive
    from medfed.server.run.replies import ReplyCollector, SiteNames
    from medfed.server.run.strategies import GivenMean
    from medfed.server.secagg.workflow import SecureAggregation
    from medfed.shared_models.config import RunConfig
    from medfed.shared_models.protocol import SecAggAction

    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid, context) -> None:
        cfg = RunConfig.from_mapping(
            {"secure-aggregation": secure, "min-nodes": clients, "round-timeout-seconds": 3600.0}
        )
        strategy = FedAvg(
            fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )
        if secure:  # the unmasked mean is computed once, by unmasking
            strategy = GivenMean(strategy)
        arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
        _wait(grid, clients)
        seconds, stages = [], []
        secagg = SecureAggregation(
            ReplyCollector(Exchange(grid, 3600.0), SiteNames()), cfg, context.run_id
        )
        for server_round in range(1, rounds + 1):
            began = time.perf_counter()
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            if secure:
                collected = secagg.collect(server_round, messages, arrays)
                replies = collected.ok
                stages.append(collected.secure.to_json()["stage-seconds"])
            elif flower_polls:
                replies = list(grid.send_and_receive(messages))
            else:
                replies = [a.reply for a in send_and_receive(grid, messages, 3600.0).answers]
            arrays, _ = strategy.aggregate_train(server_round, replies)
            if second:
                send_and_receive(grid, _empty_messages(grid, replies), 3600.0)
            seconds.append(time.perf_counter() - began)
        result_path.write_text(json.dumps(seconds))
        if stages:
            print("stage seconds per round:", json.dumps(stages), file=sys.stderr)

    def secure_run(msg, context, call_next):
        """run_simulation carries no run config: say that this run is a secure one (in a
        context of its own: Flower's run config cannot be changed in place)."""
        config = {**context.run_config, "secure-aggregation": secure}
        own = Context(context.run_id, context.node_id, context.node_config, context.state, config)
        return call_next(msg, own)

    @client.train(mods=[secure_run, secagg_mod.secagg_mod])
    def train(msg, context):
        trained = {k: a.numpy() * np.float32(1.0001) for k, a in msg.content["arrays"].items()}
        arrays = ArrayRecord({k: Array(v) for k, v in trained.items()})
        metrics = MetricRecord({"num-examples": 10, "aggregation-weight": 10.0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @client.query()
    def empty(msg, context):
        return Message(RecordDict(), reply_to=msg)

    # the hospital's SecAgg+ steps, routed as medfed's ClientApp routes them
    for action, step in (
        (SecAggAction.ADVERTISE, secagg_mod.advertise),
        (SecAggAction.SHARE, secagg_mod.share),
        (SecAggAction.UNMASK, secagg_mod.unmask),
        (SecAggAction.ABORT, secagg_mod.abort),
    ):
        client.train(action)(step)

    return server, client


def _empty_messages(grid, replies) -> list:
    from flwr.app import Message, RecordDict

    return [
        Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="query")
        for reply in replies
    ]


def _plain_and_exchange(start, clients, rounds, result_path):
    return _message_api_apps(start, clients, rounds, result_path, secure=False, second=True)


def _flower_plain(start, clients, rounds, result_path):
    return _message_api_apps(start, clients, rounds, result_path, secure=False, flower_polls=True)


def _plain(start, clients, rounds, result_path):
    return _message_api_apps(start, clients, rounds, result_path, secure=False)


def _medfed(start, clients, rounds, result_path):
    return _message_api_apps(start, clients, rounds, result_path, secure=True)


def _flower(start, clients, rounds, result_path, secure: bool = True):
    """Flower's own SecAgg+ (legacy API), same threshold and neighbourhood as medfed's;
    with `secure=False` the same API's plain rounds (DefaultWorkflow's own fit workflow)."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Timed(FedAvg):
        """FedAvg noting when each round is configured and when it is aggregated."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.began: dict[int, float] = {}
            self.seconds: list[float] = []

        def configure_fit(self, server_round, parameters, client_manager):
            self.began[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            aggregated = super().aggregate_fit(server_round, results, failures)
            self.seconds.append(time.perf_counter() - self.began[server_round])
            return aggregated

    class Returning(NumPyClient):
        def fit(self, parameters, config):
            return [p * np.float32(1.0001) for p in parameters], 10, {}

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        strategy = Timed(
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters(list(start.values())),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        secagg = SecAggPlusWorkflow(num_shares=clients, reconstruction_threshold=clients // 2 + 1)
        workflow = DefaultWorkflow(fit_workflow=secagg) if secure else DefaultWorkflow()
        _wait(grid, clients)
        workflow(grid, legacy)
        result_path.write_text(json.dumps(strategy.seconds))

    mods = [secaggplus_mod] if secure else []
    client = ClientApp(client_fn=lambda context: Returning().to_client(), mods=mods)
    return server, client


def _available() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024


def measure(mode: str, model: str, clients: int, rounds: int) -> dict:
    """Run one case in a child process; its tree's peak PSS; stop it if the machine runs low."""
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "seconds.json"
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.secure_aggregation", "--case", mode, model,
             str(clients), str(rounds), str(result_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        low_memory = threading.Event()

        def guard() -> None:
            while child.poll() is None:
                if _available() < 1.5 * GIB:
                    low_memory.set()
                    os.killpg(child.pid, 9)
                    return
                time.sleep(0.1)

        threading.Thread(target=guard, daemon=True).start()
        with PeakTreeMemory(child.pid) as memory:
            _, stderr = child.communicate()
        memory.kill_leftovers()
        if low_memory.is_set():
            return {"error": f"stopped at {memory.peak / GIB:.1f} GiB: machine memory exhausted"}
        if child.returncode != 0 or not result_path.exists():
            return {"error": stderr.decode()[-400:]}
        seconds = json.loads(result_path.read_text())
    # Round 1 also starts the simulated hospitals' worker processes and imports.
    return {
        "seconds": float(np.mean(seconds[1:])),
        "first_two": float(np.mean(seconds[:2])),
        "peak_gib": memory.peak / GIB,
    }


def with_training(rounds: int) -> str:
    """Whole medfed rounds (training, evaluation, records), plain vs secure, same seeds."""
    rows = ["| run | s/round (rounds 2..R) | × plain | final AUC |", "|---|---|---|---|"]
    base = None
    for label, extra in (("plain", []), ("secure aggregation", ["-c", "secure-aggregation=true"])):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "run"
            subprocess.run(
                [sys.executable, "-m", "medfed.server.cli", "simulate", "--task",
                 "classification", "--model", "densenet121", "--sites", "4", "--rounds",
                 str(rounds), "--out", str(out), "-c", "federated-stats=false", *extra],
                check=True, capture_output=True,
            )  # fmt: skip
            record = json.loads((out / "metrics.json").read_text())
        seconds = float(np.mean([r["seconds"] for r in record["rounds"][2:]]))
        base = base or seconds
        auc = record["rounds"][-1]["global"]["auc"]
        rows.append(f"| {label} | {seconds:.2f} | {seconds / base:.2f} | {auc:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="7m,60m")
    parser.add_argument("--clients", default="4,8")
    parser.add_argument("--rounds", type=int, default=3, help="timed: rounds 2..R")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--with-training",
        action="store_true",
        help="instead: whole medfed rounds of DenseNet121 on 4 synthetic hospitals",
    )
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.with_training:
        print(with_training(args.rounds))
        return
    if args.case:
        mode, model, clients, rounds, path = args.case
        run_case(mode, model, int(clients), int(rounds), Path(path))
        return
    results = []
    for model in args.models.split(","):
        params = sum(a.size for a in model_arrays(model).values())
        for clients in (int(c) for c in args.clients.split(",")):
            row = {"model": f"{MODELS[model]}, {params / 1e6:.1f}M", "clients": clients}
            for mode in args.modes.split(","):
                row[mode] = measure(mode, model, clients, args.rounds)
                print(f"{row['model']} x{clients} {mode}: {row[mode]}", file=sys.stderr, flush=True)
            results.append(row)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    """Markdown: seconds per round and each secure mode's ratio to its own plain round."""

    def value(row: dict, mode: str, key: str = "seconds") -> float | None:
        return row.get(mode, {}).get(key)

    def ratio(row: dict, mode: str, baseline: str, key: str = "seconds") -> str:
        got, base = value(row, mode, key), value(row, baseline, key)
        if got is None:
            error = row.get(mode, {}).get("error", "").strip()
            return error.splitlines()[-1][:60] if error else "-"
        return f"{got:.2f} ({got / base:.2f}×)" if base else f"{got:.2f}"

    def times(row: dict, mode: str, baseline: str) -> str:
        got, base = value(row, mode, "first_two"), value(row, baseline, "first_two")
        return f"{got / base:.2f}×" if got and base else "-"

    lines = [
        "| model | hospitals | plain, Flower polls | plain, medfed polls | plain, Flower legacy "
        "| medfed SecAgg+ (× medfed plain) | Flower SecAgg+ (× Flower legacy plain) "
        "| floor: plain + empty exchange (× medfed plain) "
        "| rounds 1-2: medfed / Flower | peak GiB: " + " / ".join(MODES) + " |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        plain = [f"{value(row, m):.2f}" if value(row, m) else "-" for m in MODES[:3]]
        memory = " / ".join(
            f"{value(row, m, 'peak_gib'):.1f}" if value(row, m, "peak_gib") else "-" for m in MODES
        )
        cells = [
            row["model"],
            str(row["clients"]),
            *plain,
            ratio(row, "medfed", "plain"),
            ratio(row, "flower", "flower-legacy"),
            ratio(row, "plain+exchange", "plain"),
            f"{times(row, 'medfed', 'plain')} / {times(row, 'flower', 'flower-legacy')}",
            memory,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
