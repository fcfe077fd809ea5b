"""A run's folder on disk: metrics.json after every round, checkpoints, the final model.

Each is written atomically (`atomic_files.atomic_write`), so a crash never leaves
a truncated file and metrics.json always reflects the last completed round.
What a finished round sends here, and everywhere else a round is recorded,
is server/run/round_outputs.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from medfed.shared_models import processes
from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import (
    CHECKPOINTS,
    GLOBAL_MODEL,
    METRICS_JSON,
    MODEL_JSON,
    UNCHECKPOINTED_RELEASES,
    checkpoint_name,
    hold_writer_lock,
    read_metrics,
)
from medfed.shared_models.weights import norm_keys, state_dict_from_record


class RunAbandoned(RuntimeError):
    """Someone else closed this run's record (interrupted, or found dead): stop writing."""


class RunRecord:
    """Append-as-you-go history of one federated run, mirrored to disk.

    The record names the process writing it (`processes.identity`), so that
    a coordinator or `medfed simulate` can tell a run whose ServerApp died
    from one still going, and close it; once closed by them, this process
    never writes over their verdict.
    """

    def __init__(self, cfg: RunConfig, out: Path, history: dict[str, Any] | None = None) -> None:
        self.out = out
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.lock: int | None = hold_writer_lock(out)  # released when the record finishes
        self.data: dict[str, Any] = {
            **(history or {}),
            "config": cfg.to_mapping(),
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process": processes.identity(),
            "writer": secrets.token_hex(8),  # this record, whoever else writes the folder
        }
        self.data.setdefault("rounds", [])
        for stale in ("finished", "error"):
            self.data.pop(stale, None)
        self.flush()

    def set_pretrained(self, transfer: dict[str, Any]) -> None:
        """What the initial model was loaded from (transfer learning)."""
        self.data["pretrained"] = transfer
        self.flush()

    def set_bundle(self, identity: dict[str, Any]) -> None:
        """The MONAI bundle a bundle run federates: its path and the hash of its configs."""
        self.data["bundle"] = identity
        self.flush()

    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        """The sites' summaries, as they sent them (hidden counts recorded as "hidden")."""
        self.data["site-statistics"] = stats
        self.flush()

    def set_cross_site(self, matrix: dict[str, Any]) -> None:
        """The cross-site evaluation matrix (CrossSiteMatrix.to_json)."""
        self.data["cross-site"] = matrix
        self.flush()

    def released(self) -> None:
        """A noisy (DP) aggregate is about to leave the coordinator: until a checkpoint
        holds the ledger that counts it, a resumed run must count it (server.run.resume)."""
        self.data[UNCHECKPOINTED_RELEASES] = self.data.get(UNCHECKPOINTED_RELEASES, 0) + 1
        self.flush()

    def add_round(self, entry: dict[str, Any]) -> None:
        """One finished round's entry (RoundSummary.to_json), written after its checkpoint
        (whose ledger counts every release so far)."""
        self.data[UNCHECKPOINTED_RELEASES] = 0
        self.data["rounds"].append(entry)
        self.flush()

    def validate_round(self, server_round: int, summary: dict[str, Any]) -> dict[str, Any]:
        """Add the validation of round `server_round`'s model to its entry (it arrives with
        the next round's training replies, or the last round's evaluation); returns the entry."""
        entry = next(r for r in self.data["rounds"] if r["round"] == server_round)
        entry["global"] = summary["global"]
        entry["sites"] = summary["sites"]
        entry["failures"] = {**summary["failures"], **entry["failures"]}
        entry["failed"] = sorted(entry["failures"])
        entry["validated-by"] = summary["validated-by"]
        entry["exchanges"] = summary["exchanges"]
        self.flush()
        return entry

    def finish(self, status: str, error: str | None = None) -> None:
        """The run's outcome: completed, or failed with the reason."""
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if error:
            self.data["error"] = error
        self.flush()
        if self.lock is not None:
            os.close(self.lock)  # the outcome is on disk: another may take the folder over
            self.lock = None

    def flush(self) -> None:
        """metrics.json as the record stands now (RunAbandoned if another closed it)."""
        on_disk = read_metrics(self.out)
        if (
            on_disk is not None
            and on_disk.get("writer") == self.data["writer"]
            and on_disk.get("status") != self.data["status"] == "running"
        ):
            raise RunAbandoned(
                f"{self.out / METRICS_JSON} says {on_disk['status']}: "
                f"{on_disk.get('error', '')}; this process stops writing"
            )
        text = json.dumps(self.data, indent=2, allow_nan=True)
        atomic_write(self.out / METRICS_JSON, text.encode())

    def checkpoint(
        self, server_round: int, arrays: ArrayRecord, state: dict[str, Any] | None = None
    ) -> str:
        """The global arrays after `server_round`, the strategy and random state needed to
        resume from there, and the config that produced them; returns the file's sha256
        (kept in the round's entry of metrics.json, checked on resume)."""
        path = self.out / CHECKPOINTS / checkpoint_name(server_round)
        payload = {
            "round": server_round,
            "config": self.data["config"],
            "arrays": state_dict_from_record(arrays),
            "state": state or {},
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def save_model(self, net: torch.nn.Module, cfg: RunConfig, server_round: int) -> str:
        """global_model.pt (full state dict) and model.json (how to rebuild it); its sha256."""
        path = self.out / GLOBAL_MODEL
        atomic_write(path, lambda tmp: torch.save(net.state_dict(), tmp))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        meta = {
            "task": cfg.task,
            "model": cfg.model,
            "round": server_round,
            "classes": list(cfg.classes),
            "sha256": digest,
            "config": cfg.to_mapping(),
        }
        if "bundle" in self.data:  # the configs that rebuild the network and trained it
            meta["bundle"] = self.data["bundle"]
        if cfg.keeps_norms_local:  # FedBN: these hold initial values here; each site has its own
            meta["kept-at-hospitals"] = norm_keys(net)
        atomic_write(self.out / MODEL_JSON, json.dumps(meta, indent=2).encode())
        return digest
