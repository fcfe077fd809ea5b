"""One federated run at the coordinator: its folder, the rounds, the model, the records.

The ServerApp (server/app.py) imports this module when a run starts.
"""

from __future__ import annotations

import os
import random
import shutil
from functools import partial
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from medfed.server.log_tags import PROGRESS_TAG, RUN_END_TAG
from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.report import LAUNCHER_WRITES_REPORT_ENV, write_report
from medfed.server.run.resume import (
    ResumeError,
    ResumePoint,
    check_network,
    load_resume_point,
    mark_continued,
    resume_folder,
)
from medfed.server.run.round_loop import RoundLoop
from medfed.server.run.round_outputs import RunOutputs
from medfed.server.run.run_record import RunAbandoned, RunRecord
from medfed.server.run.strategies import build_strategy
from medfed.shared_models.audit import audit
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.monai_bundle import Bundle
from medfed.shared_models.pretrained import load_pretrained
from medfed.shared_models.protocol import Config
from medfed.shared_models.round_terms import run_config_digest
from medfed.shared_models.run_folder import (
    CHECKPOINTS,
    GLOBAL_MODEL,
    PROGRESS_LOG,
    RUN_BUNDLE,
    RUNS_DIR_ENV,
    checkpoint_name,
)
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import load_record, to_record


def run_folder(cfg: RunConfig, run_id: int) -> Path:
    """Where this run writes: `out-dir`, or <runs dir>/<run id> on a medfed coordinator.

    On a coordinator, concurrent and successive runs never share a folder
    and `medfed coordinator pull` finds them by run id.
    """
    runs = os.environ.get(RUNS_DIR_ENV)
    if runs and cfg.out_dir == RunConfig().out_dir:
        return Path(runs) / str(run_id)
    return cfg.out_path.resolve()


def _app_hash(grid: Grid) -> str:
    """The FAB hash Flower recorded for this run: which app code the hospitals ran."""
    try:
        return str(grid.run.fab_hash)
    except (AttributeError, RuntimeError):
        return "unknown"


def run(grid: Grid, context: Context) -> None:
    """One federated run; its folder tells the outcome however the run ends."""
    try:
        cfg = RunConfig.from_mapping(context.run_config)
    except ConfigError as err:
        _refuse(context, err)
        raise
    out = run_folder(cfg, context.run_id)
    resume = _resume_point(cfg, out)
    record = RunRecord(cfg, out, resume.history if resume else None)
    telemetry = RoundTelemetry(context.run_id, cfg.task)
    with (out / PROGRESS_LOG).open("a", buffering=1) as progress_log:
        outputs = RunOutputs(record, telemetry, progress_log, context.run_id, cfg)
        try:
            _run(grid, context, cfg, outputs, resume)
        finally:
            if record.data["status"] != "completed" or not os.environ.get(
                LAUNCHER_WRITES_REPORT_ENV
            ):
                outputs.progress(f"wrote {write_report(out).name} and plots/ in {out}")
    # Completed, and nothing of the run's is written after this line (a failure's traceback
    # still follows in Flower's log, so a failed run streams to its end). Under `medfed
    # simulate`, the launcher writes the completed run's report next.
    log(INFO, "%s %s", RUN_END_TAG, out)


def _refuse(context: Context, err: ConfigError) -> None:
    """A run config the coordinator cannot run: one line naming the key, an audit entry and,
    on a medfed coordinator, a failed run folder `medfed coordinator pull` finds by run id
    (`flwr run` itself exits 0 whatever the ServerApp did)."""
    reason = f"run config refused: {err}"
    runs = os.environ.get(RUNS_DIR_ENV)
    if runs:
        record = RunRecord(RunConfig(), Path(runs) / str(context.run_id))
        record.data["config"] = dict(context.run_config)  # as received, not the defaults
        record.finish("failed", error=reason)
    audit("run-finished", run=context.run_id, status="failed", error=reason)
    log(ERROR, "%s run failed: %s", PROGRESS_TAG, reason)


def _resume_point(cfg: RunConfig, out: Path) -> ResumePoint | None:
    """The round to carry on from (`resume-from`), checked before any record is written.

    A refusal here leaves the interrupted run's folder as it was; a run
    writing elsewhere (a coordinator's new run folder) records the refusal as
    its failure. The new folder gets a copy of the checkpoint it starts from.
    """
    if not cfg.resume_from:
        return None
    try:
        point = load_resume_point(cfg, os.environ.get(RUNS_DIR_ENV))
        check_network(cfg, point)
        if point.folder != out.resolve():  # carried on elsewhere: self-contained
            name = checkpoint_name(point.server_round)
            (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            shutil.copy2(point.folder / CHECKPOINTS / name, out / CHECKPOINTS / name)
        return point
    except ResumeError as err:
        if resume_folder(cfg.resume_from, os.environ.get(RUNS_DIR_ENV)) != out.resolve():
            RunRecord(cfg, out).finish("failed", error=str(err))
            audit("run-finished", status="failed", error=str(err))
        log(ERROR, "%s run failed: %s", PROGRESS_TAG, err)
        raise


def _run(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    outputs: RunOutputs,
    resume: ResumePoint | None,
) -> None:
    """Initialise the model, run every round, save the global model; record a failure."""
    outputs.progress(
        f"run {context.run_id}: {cfg.task}/{cfg.model}, {cfg.strategy}, "
        f"{cfg.num_server_rounds} rounds, quorum {cfg.min_nodes}; writing to {outputs.record.out}"
    )
    audit(
        "run-started",
        run=context.run_id,
        app_hash=_app_hash(grid),
        config=cfg.to_mapping(),
        nodes=sorted(grid.get_node_ids()),
        **({"resumed_from": str(resume.folder), "after_round": resume.server_round}
           if resume else {}),
    )  # fmt: skip
    try:
        if resume is not None and resume.folder != outputs.record.out.resolve():
            mark_continued(resume.folder, outputs.record.out)  # once its own record exists
        net = _initial_network(cfg, outputs, resumed=resume is not None)
        request = _request(cfg, outputs, context.run_id)
        loop = RoundLoop(
            grid,
            cfg,
            outputs,
            partial(build_strategy, cfg),
            context.run_id,
            request=request,
            run_config=run_config_digest(context.run_config),
        )
        local = cfg.keeps_norms_local
        load_record(net, loop.run(to_record(net, local), resume), local)
        digest = outputs.record.save_model(net, cfg, cfg.num_server_rounds)
        loop.cross_site()  # after the model is saved: its failures never cost the model
        outputs.record.finish("completed")
        audit("run-finished", run=context.run_id, status="completed", model_sha256=digest)
        outputs.progress(
            f"global model sha256 {digest[:16]}… saved to {outputs.record.out / GLOBAL_MODEL}"
        )
        rounds = outputs.record.data["rounds"]
        outcome = TASKS[cfg.task].outcome(rounds[-1]["global"] if rounds else {}, cfg)
        if outcome is not None:
            outputs.progress(outcome)
    except RunAbandoned as err:  # closed by whoever stopped it: their record stands
        log(ERROR, "%s %s", PROGRESS_TAG, err)
        raise
    except Exception as err:
        outputs.record.finish("failed", error=str(err))
        audit("run-finished", run=context.run_id, status="failed", error=str(err))
        outputs.progress(f"run failed: {err}")
        log(ERROR, "%s run failed: %s", PROGRESS_TAG, err)
        raise


def _request(cfg: RunConfig, outputs: RunOutputs, run_id: int) -> dict[str, str]:
    """What every training and evaluation request carries besides the round: for a bundle
    run, the hash of the coordinator's bundle configs, which each hospital checks its own
    copy against before running any of it (recorded in metrics.json and model.json). The
    hashed files are copied into the run folder (`bundle/`): what a hospital handed the
    folder approves and rebuilds the model from (client/run_bundle.py)."""
    if cfg.task != "bundle":
        return {}
    bundle = Bundle(cfg.bundle)
    bundle.copy_hashed(outputs.record.out / RUN_BUNDLE)
    outputs.record.set_bundle(bundle.identity())
    audit("run-bundle", run=run_id, path=str(bundle.root), sha256=bundle.sha256)
    outputs.progress(f"bundle {bundle.root}: configs sha256 {bundle.sha256[:16]}…")
    return {Config.BUNDLE_SHA256: bundle.sha256}


def _initial_network(cfg: RunConfig, outputs: RunOutputs, resumed: bool) -> nn.Module:
    """The seeded network, initialised from `pretrained-weights` when given (a resumed
    run takes its weights from the checkpoint instead)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = TASKS[cfg.task].build_network(cfg)
    if cfg.pretrained_weights and not resumed:
        transfer = load_pretrained(net, Path(cfg.pretrained_weights).expanduser())
        outputs.record.set_pretrained(transfer.to_json())
        for line in transfer.summary():
            outputs.progress(line)
    return net
