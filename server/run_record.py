"""The run folder: metrics.json after every round, checkpoints, the final model.

Everything is written atomically (temp file + rename) so a crash mid-round
never leaves a truncated file, and metrics.json always reflects the last
completed round.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from medfed.shared_models.config import RunConfig
from medfed.shared_models.weights import state_dict_from_record


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunRecord:
    """Append-as-you-go history of one federated run, mirrored to disk."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.out = out
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "config": cfg.to_mapping(),
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rounds": [],
        }
        self.flush()

    def set_pretrained(self, transfer: dict[str, Any]) -> None:
        self.data["pretrained"] = transfer
        self.flush()

    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        self.data["site-statistics"] = stats
        self.flush()

    def add_round(self, entry: dict[str, Any]) -> None:
        self.data["rounds"].append(entry)
        self.flush()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if error:
            self.data["error"] = error
        self.flush()

    def flush(self) -> None:
        text = json.dumps(self.data, indent=2, allow_nan=True)
        atomic_write_bytes(self.out / "metrics.json", text.encode())

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        """Enough to resume: the global arrays after `server_round` and the config."""
        path = self.out / "checkpoints" / f"round-{server_round:03d}.pt"
        payload = {
            "round": server_round,
            "config": self.data["config"],
            "arrays": state_dict_from_record(arrays),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    def save_model(self, net: torch.nn.Module, cfg: RunConfig, server_round: int) -> str:
        """global_model.pt (full state dict) and model.json (how to rebuild it)."""
        path = self.out / "global_model.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        meta = {
            "task": cfg.task,
            "model": cfg.model,
            "round": server_round,
            "classes": list(cfg.classes),
            "sha256": digest,
            "config": cfg.to_mapping(),
        }
        atomic_write_bytes(self.out / "model.json", json.dumps(meta, indent=2).encode())
        return digest
