"""The run folder on disk: metrics.json after every round, checkpoints, the final model.

Every file is written atomically (`runtime.atomic_write`), so a crash
mid-round never leaves a truncated file and metrics.json always reflects the
last completed round.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import CHECKPOINTS, GLOBAL_MODEL, METRICS_JSON, MODEL_JSON
from medfed.shared_models.runtime import atomic_write
from medfed.shared_models.weights import state_dict_from_record


class RunRecord:
    """Append-as-you-go history of one federated run, mirrored to disk."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.out = out
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "config": cfg.to_mapping(),
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rounds": [],
        }
        self.flush()

    def set_pretrained(self, transfer: dict[str, Any]) -> None:
        """What the initial model was loaded from (transfer learning)."""
        self.data["pretrained"] = transfer
        self.flush()

    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        """The sites' summaries, as they sent them (small counts suppressed)."""
        self.data["site-statistics"] = stats
        self.flush()

    def add_round(self, entry: dict[str, Any]) -> None:
        self.data["rounds"].append(entry)
        self.flush()

    def finish(self, status: str, error: str | None = None) -> None:
        """The run's outcome: completed, or failed with the reason."""
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if error:
            self.data["error"] = error
        self.flush()

    def flush(self) -> None:
        text = json.dumps(self.data, indent=2, allow_nan=True)
        atomic_write(self.out / METRICS_JSON, text.encode())

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        """The global arrays after `server_round`, with the config that produced them."""
        path = self.out / CHECKPOINTS / f"round-{server_round:03d}.pt"
        payload = {
            "round": server_round,
            "config": self.data["config"],
            "arrays": state_dict_from_record(arrays),
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path

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
        atomic_write(self.out / MODEL_JSON, json.dumps(meta, indent=2).encode())
        return digest
