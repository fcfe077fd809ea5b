"""What a hospital keeps across every run it takes part in: the global models whose sum it
helped reveal, and the noise of every update it sent with its own DP noise.

The run ledger (round_guard.RoundLedger) lives per run id; a coordinator can open a new
run, or resume one, and send round 1 of the same global model again. Training repeats
bit for bit (it is seeded by the run's seed and the round), so the difference of the
sums of the two runs over {V, A, B, C} and {A, B, C} was V's update exactly. A hospital
therefore never helps reveal two sums over one global model: once it hands out unmask
shares for a round, that model's hash is kept here, node-wide, and a secure round on it in
any later run is refused. Until it has unmasked, nothing is revealed, so a run that died
mid-round can still be carried on. Its own epsilon against the coordinator composes over
every run too: the same data, released again, is a release again.

On a deployed node the ledger is a file under the node's cache folder, written under a
lock (several ClientApp processes may run at once); a simulated node keeps it in the
run's node state (a simulation is one researcher's own machine, one run at a time).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.supercore import log

from medfed.client.privacy.round_guard import RoundRefused
from medfed.client.settings import node_settings
from medfed.shared_models.atomic_files import durable_write

STATE_KEY = "medfed-node-ledger"  # a simulated node's ledger, in its node state


def node_ledger_file(context: Context) -> Path | None:
    """The node-wide ledger of a deployed node (None in a simulation)."""
    cache = node_settings(context).cache_dir
    return None if cache is None else cache / "ledger" / "node.json"


class NodeLedger:
    """Read, change and write the node-wide ledger in one locked step (`edit`)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.file = node_ledger_file(context)

    @contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """The ledger ({"released": [...], "noise": [...]}) to read and change; written
        back when the block ends without an error."""
        if self.file is None:
            kept = self.context.state.config_records.get(STATE_KEY)
            values = _values(dict(kept) if kept is not None else {})
            yield values
            self.context.state[STATE_KEY] = ConfigRecord(values)
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            values = _values(self._read())
            yield values
            durable_write(self.file, json.dumps(values).encode())

    def _read(self) -> dict[str, Any]:
        if not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError) as err:  # fail closed: nothing is released past it
            log(ERROR, "[medfed] the node ledger %s cannot be read: %s", self.file, err)
            raise RoundRefused("this node's ledger cannot be read (see its log)") from None
        if not isinstance(data, dict):
            raise RoundRefused("this node's ledger cannot be read (see its log)")
        return data

    def require_unreleased(self, model: bytes) -> None:
        """Refuse a secure round on a global model whose sum this hospital helped reveal."""
        with self.edit() as values:
            if model.hex() in values["released"]:
                raise RoundRefused(
                    "this hospital already helped reveal a sum over this global model (same "
                    "SHA-256, in this or an earlier run): a second sum would give its update "
                    "away by difference"
                )

    def release(self, model: bytes) -> None:
        """Record, before the unmask shares leave, that a sum over `model` is revealed."""
        with self.edit() as values:
            if model.hex() not in values["released"]:
                values["released"].append(model.hex())

    def add_noise(self, multiplier: float) -> list[float]:
        """Record one update sent with this hospital's own noise; every one so far."""
        with self.edit() as values:
            values["noise"].append(float(multiplier))
            return list(values["noise"])


def _values(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "released": [str(v) for v in data.get("released", [])],
        "noise": [float(v) for v in data.get("noise", [])],
    }
