"""A hand-written Flower app doing the overhead bench's work: what a team writes without medfed.

    python -m tests.bench.flower_app DATA TASK ROUNDS RESULT.json

Flower's own FedAvg (`strategy.start`) and Message API, its simulation engine
(`run_simulation`, Ray, one CPU per hospital), each site's training and
validation split cached in memory in the hospital's worker (MONAI
CacheDataset with medfed's transforms), medfed's network, loss, local epochs
and metrics. None of medfed's checks, records, quorum, statistics, audit,
reports or checkpoints. Writes the final global metric and the time of every
round (from Flower's `evaluate_fn`, called after each round's aggregation).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

_CACHED: dict = {}  # per worker process: each site's loaders, kept across messages


def worker_cache() -> dict:
    """This worker's cache. Referenced through this importable function, it is the same
    dict in every message a worker runs (a closure's dict is pickled with each message,
    as Flower's app files keep their data in module globals)."""
    return _CACHED


def apps(data: Path, task: str, rounds: int, result: Path) -> tuple:
    """The ServerApp and ClientApp; the server writes `result` when the run ends."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from monai.data import CacheDataset, DataLoader

    from medfed.client.data.site import load_site
    from medfed.client.data.site_paths import site_folders
    from medfed.client.data.transforms import site_transforms
    from medfed.shared_models.config import RunConfig
    from medfed.shared_models.tasks import TASKS

    cfg = RunConfig.from_mapping({"task": task})
    the_task, cpu, folders = TASKS[task], torch.device("cpu"), site_folders(data)
    headline = the_task.headline_metric

    def loaders(partition: int) -> tuple[DataLoader, DataLoader, int, int]:
        """The site's two splits, cached in this worker for the whole run."""
        cached = worker_cache()
        if partition not in cached:
            site = load_site(folders[partition], cfg)

            def loader(items: list, train: bool) -> DataLoader:
                dataset = CacheDataset(
                    items, site_transforms(cfg, site.modality, train), progress=False
                )
                return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train)

            cached[partition] = (
                loader(site.train, True), loader(site.val, False), len(site.train), len(site.val)
            )  # fmt: skip
        return cached[partition]

    def network(msg: Message) -> torch.nn.Module:
        net = the_task.build_network(cfg)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return net

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        train_batches, _, examples, _ = loaders(int(context.node_config["partition-id"]))
        net = network(msg)
        the_task.train(net, train_batches, cfg, cpu)
        content = {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"num-examples": examples}),
        }
        return Message(RecordDict(content), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, val_batches, _, examples = loaders(int(context.node_config["partition-id"]))
        metrics = the_task.evaluate(network(msg), val_batches, cfg, cpu)
        record = MetricRecord({headline: metrics[headline], "num-examples": examples})
        return Message(RecordDict({"metrics": record}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(cfg.seed)
        start = ArrayRecord(the_task.build_network(cfg).state_dict())
        sites = len(folders)
        strategy = FedAvg(min_train_nodes=sites, min_evaluate_nodes=sites,
                          min_available_nodes=sites)  # fmt: skip
        stamps: list[float] = []
        outcome = strategy.start(
            grid=grid, initial_arrays=start, num_rounds=rounds,
            evaluate_fn=lambda server_round, arrays: stamps.append(time.perf_counter()),
        )  # fmt: skip
        final = outcome.evaluate_metrics_clientapp[rounds][headline]
        rounds_seconds = [b - a for a, b in itertools.pairwise(stamps)]
        result.write_text(json.dumps({"final_metric": final, "rounds": rounds_seconds}))

    return server, client


def main() -> None:
    data, task, rounds, result = sys.argv[1:5]
    from flwr.simulation import run_simulation

    from tests.bench.flower_app import apps  # by name, not __main__: workers import it

    server, client = apps(Path(data), task, int(rounds), Path(result))
    folders = len([p for p in Path(data).iterdir() if p.is_dir()])
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=folders,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


if __name__ == "__main__":
    main()
