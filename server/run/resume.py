"""Continuing a run from its last completed round (`resume-from`, `medfed simulate --resume`).

A resumed run is the interrupted run carried on, not a new one seeded with
its weights: the same round numbering, one history in which every round
appears exactly once, and the strategy's and the random streams' state as
they were after that round (strategy_state; under DP, noisy models released
after that checkpoint are counted and the random streams drawn afresh
instead). A run is carried on elsewhere once at most. Only a checkpoint whose
SHA-256 matches the one metrics.json recorded for that round is used, and
only for the same task, network and settings: a corrupted, replaced or
foreign checkpoint is refused with a message naming the file or the keys.
SecAgg+ always starts with fresh keys (a new run has fresh node contexts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from medfed.server.run import run_status
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.run_folder import (
    CHECKPOINTS,
    CONTINUED_IN,
    METRICS_JSON,
    UNCHECKPOINTED_RELEASES,
    RunFolderError,
    checkpoint_name,
    read_metrics,
    writer_gone,
)
from medfed.shared_models.weights import incompatibilities, net_template, record_from_state_dict

# Keys a resumed run may set differently from the run it continues: how long it
# waits, how far it goes, where it writes. Everything else must be equal.
MAY_CHANGE = frozenset(
    {"num-server-rounds", "round-timeout-seconds", "node-wait-seconds", "out-dir",
     "resume-from", "data-root"}
)  # fmt: skip
# What carries over from the interrupted run's record besides its rounds.
CARRIED = ("site-statistics", "pretrained", "resumed", UNCHECKPOINTED_RELEASES)


class ResumeError(ConfigError):
    """A run cannot be resumed from the folder given; the message says which file and why."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: after `server_round` of the run in `folder`."""

    folder: Path
    server_round: int
    arrays: ArrayRecord
    state: dict[str, Any]
    history: dict[str, Any]  # the interrupted run's record, to carry on
    # Noisy (DP) models the interrupted run released after its last checkpoint: counted
    # in the privacy ledger, and the resumed run's noise drawn fresh (never the same twice).
    lost_releases: int = 0


def resume_folder(value: str, runs_dir: str | None) -> Path:
    """The run folder `resume-from` names: a run id on a coordinator, else a path."""
    if value.isdigit() and runs_dir:
        return Path(runs_dir) / value
    return Path(value).expanduser().resolve()


def load_resume_point(cfg: RunConfig, runs_dir: str | None) -> ResumePoint:
    """The last completed round of the run `cfg.resume_from` names, checked end to end."""
    folder = resume_folder(cfg.resume_from, runs_dir)
    record = _resumable_record(folder)
    rounds = record["rounds"]
    last = rounds[-1]["round"]
    if last >= cfg.num_server_rounds:
        raise ResumeError(
            f"resume-from {folder}: it completed round {last} of "
            f"{cfg.num_server_rounds}; raise 'num-server-rounds' to train further"
        )
    _same_settings(folder, record.get("config"), cfg)
    _same_bundle(folder, record.get("bundle"), cfg)
    path = folder / CHECKPOINTS / checkpoint_name(last)
    payload = _checked_checkpoint(path, rounds[-1].get("checkpoint-sha256"), last)
    arrays = _arrays_in(payload.get("arrays"), path)
    history = {key: copy.deepcopy(record[key]) for key in CARRIED if key in record}
    history["rounds"] = rounds
    history["resumed"] = [
        *history.get("resumed", []),
        {"from": str(folder), "after-round": last, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    ]
    released = record.get(UNCHECKPOINTED_RELEASES)
    lost = released if isinstance(released, int) and released > 0 and cfg.dp_mode != "off" else 0
    return ResumePoint(folder, last, arrays, payload.get("state", {}), history, lost_releases=lost)


def _resumable_record(folder: Path) -> dict[str, Any]:
    """The interrupted run's record, once it is one that can be carried on here."""
    try:
        record = read_metrics(folder)
    except RunFolderError as err:
        raise ResumeError(f"resume-from: {err}") from err
    if record is None:
        raise ResumeError(f"resume-from {folder}: no {METRICS_JSON}: not a medfed run folder")
    if record.get("status") == "running" and not run_status.is_orphaned(folder):
        raise ResumeError(f"resume-from {folder}: that run is still running")
    if record.get(CONTINUED_IN):
        raise ResumeError(
            f"resume-from {folder}: already carried on in {record[CONTINUED_IN]}; resume from "
            "that run instead (two continuations of one run would release two models from "
            "the same state)"
        )
    rounds = record.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise ResumeError(f"resume-from {folder}: no completed round to resume from")
    numbers = [r.get("round") if isinstance(r, dict) else None for r in rounds]
    if numbers != list(range(len(rounds))):
        raise ResumeError(f"resume-from {folder}: its rounds are not 0..{len(rounds) - 1}")
    return record


def mark_continued(folder: Path, out: Path) -> None:
    """Note in the interrupted run's record where it is carried on; ResumeError when it
    already is, or came back to life. Done under the folder's writer lock, so two
    resumes (or a resume and the coordinator closing the run) never interleave."""
    with writer_gone(folder) as gone:
        if gone is False:
            raise ResumeError(f"resume-from {folder}: that run is running again")
        record = read_metrics(folder) or {}
        if record.get(CONTINUED_IN):
            raise ResumeError(f"resume-from {folder}: already carried on in {record[CONTINUED_IN]}")
        record[CONTINUED_IN] = str(out)
        text = json.dumps(record, indent=2, allow_nan=True)
        atomic_write(folder / METRICS_JSON, text.encode())


def _arrays_in(state: object, path: Path) -> ArrayRecord:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ResumeError(f"resume-from: checkpoint {path} holds no arrays")
    return record_from_state_dict(state)


def check_network(cfg: RunConfig, point: ResumePoint) -> None:
    """ResumeError unless the checkpoint's arrays fit this run's network name for name
    (before any hospital is sent them)."""
    from medfed.shared_models.tasks import TASKS

    template = net_template(TASKS[cfg.task].build_network(cfg), cfg.keeps_norms_local)
    problems = incompatibilities(point.arrays, template)
    if problems:
        raise ResumeError(
            f"resume-from {point.folder}: checkpoint of round {point.server_round} does not "
            "fit this run's network: " + "; ".join(problems[:3])
        )


def _same_settings(folder: Path, recorded: object, cfg: RunConfig) -> None:
    """ResumeError naming every key (beyond MAY_CHANGE) whose value differs."""
    now = cfg.to_mapping()
    try:
        then = RunConfig.from_mapping(recorded if isinstance(recorded, dict) else {}).to_mapping()
    except ConfigError as err:
        raise ResumeError(f"resume-from {folder}: its recorded config is invalid: {err}") from err
    keys = (now.keys() | then.keys()) - MAY_CHANGE
    differing = sorted(k for k in keys if now.get(k) != then.get(k))
    if differing:
        shown = ", ".join(f"{k} = {then.get(k)!r} there, {now.get(k)!r} here" for k in differing)
        raise ResumeError(
            f"resume-from {folder}: that run used other settings ({shown}); a resumed "
            f"run may only change {sorted(MAY_CHANGE - {'resume-from', 'out-dir'})}"
        )


def _same_bundle(folder: Path, recorded: object, cfg: RunConfig) -> None:
    """ResumeError unless a bundle run carries on with the bundle configs it started with
    (the same path may hold other configs by now, whose network the checkpoint need not
    fit); checked on bytes, before the network is built from them."""
    if cfg.task != "bundle":
        return
    from medfed.shared_models.monai_bundle import bundle_sha256  # MONAI: bundle runs only

    then = recorded.get("sha256") if isinstance(recorded, dict) else None
    now = bundle_sha256(Path(cfg.bundle).expanduser())
    if then != now:
        raise ResumeError(
            f"resume-from {folder}: that run federated bundle sha256 {then}, the configs at "
            f"'bundle' = '{cfg.bundle}' now hash to {now}"
        )


def _checked_checkpoint(path: Path, recorded: str | None, server_round: int) -> dict[str, Any]:
    """The checkpoint's content, once its SHA-256 matches the one recorded for its round."""
    if not path.is_file():
        raise ResumeError(f"resume-from: checkpoint {path} is missing")
    if not recorded:
        raise ResumeError(f"resume-from: no SHA-256 is recorded for {path}; it cannot be trusted")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != recorded:
        raise ResumeError(
            f"resume-from: checkpoint {path} is corrupted or was replaced "
            f"(sha256 {digest[:16]}…, recorded {recorded[:16]}…)"
        )
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file
        raise ResumeError(f"resume-from: checkpoint {path} cannot be read: {err}") from err
    if not isinstance(payload, dict) or payload.get("round") != server_round:
        raise ResumeError(f"resume-from: checkpoint {path} is not round {server_round}'s")
    return payload
