"""The coordinator side: a Flower ServerApp running medfed's round loop."""

from __future__ import annotations

import json
import os
import random
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from medfed.server.federation import FederatedRun
from medfed.server.report import write_report
from medfed.server.run_record import RunRecord
from medfed.server.strategies import build_strategy
from medfed.shared_models.audit import audit
from medfed.shared_models.config import RunConfig
from medfed.shared_models.pretrained import load_pretrained
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import load_record, to_record

app = ServerApp()

PROGRESS_LOG = "progress.log"


def run_folder(cfg: RunConfig, run_id: int) -> Path:
    """Where this run writes: `out-dir`, or <runs dir>/<run id> on a medfed coordinator.

    `medfed coordinator start` sets MEDFED_RUNS_DIR so that concurrent and
    successive runs never share a folder and `medfed coordinator pull` finds them.
    """
    runs = os.environ.get("MEDFED_RUNS_DIR")
    if runs and cfg.out_dir == RunConfig().out_dir:
        return Path(runs) / str(run_id)
    return cfg.out_path.resolve()


def _app_hash(grid: Grid) -> str:
    """The FAB hash Flower recorded for this run: which app code the hospitals ran."""
    try:
        return str(grid.run.fab_hash)
    except (AttributeError, RuntimeError):
        return "unknown"


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    out = run_folder(cfg, context.run_id)
    record = RunRecord(cfg, out)
    progress = (out / PROGRESS_LOG).open("a", buffering=1)

    def say(line: str) -> None:
        log(INFO, "[medfed] %s", line)
        progress.write(line + "\n")

    def event(row: dict) -> None:
        """One machine-readable line per round (medfed simulate draws its table from it)."""
        log(INFO, "[medfed-round] %s", json.dumps(row))

    task = TASKS[cfg.task]
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = task.build_network(cfg)
    say(
        f"run {context.run_id}: {cfg.task}/{cfg.model}, {cfg.strategy}, "
        f"{cfg.num_server_rounds} rounds, quorum {cfg.min_nodes}; writing to {out}"
    )
    audit(
        "run-started",
        run=context.run_id,
        app_hash=_app_hash(grid),
        config=cfg.to_mapping(),
        nodes=sorted(grid.get_node_ids()),
    )
    try:
        if cfg.pretrained_weights:
            transfer = load_pretrained(net, Path(cfg.pretrained_weights).expanduser())
            record.set_pretrained(transfer.to_json())
            for line in transfer.summary():
                say(line)
        runner = FederatedRun(
            grid,
            lambda connected: build_strategy(cfg, connected),
            cfg,
            net,
            record,
            task.headline_metric,
            say,
            context.run_id,
            event,
        )
        arrays = runner.run(to_record(net))
        load_record(net, arrays)
        digest = record.save_model(net, cfg, cfg.num_server_rounds)
        record.finish("completed")
        audit("run-finished", run=context.run_id, status="completed", model_sha256=digest)
        say(f"global model sha256 {digest[:16]}… saved to {out / 'global_model.pt'}")
    except Exception as err:
        record.finish("failed", error=str(err))
        audit("run-finished", run=context.run_id, status="failed", error=str(err))
        say(f"run failed: {err}")
        log(ERROR, "[medfed] run failed: %s", err)
        raise
    finally:
        say(f"wrote {write_report(out).name} and plots/ in {out}")
        progress.close()
