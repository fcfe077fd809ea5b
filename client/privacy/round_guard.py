"""The hospital's own record of a run, and the terms it trains on: what no coordinator resets.

An attacker running the coordinator tried two things a consortium's
hospitals must refuse. Running a round twice (round 1 with {V, A, B, C},
then again with {A, B, C} on the same model): local training repeats bit for
bit, so the difference of the two sums is V's update. And giving hospitals
different settings (mu = 1000 for all but the victim): the "mean" is then
the victim's update. So each hospital keeps, per run, a ledger the
coordinator cannot reset, and checks every training message against the
run's own config before anything trains:

- round numbers only increase: a round at or below the last one trained is
  refused, and so is a SecAgg+ key exchange for it (`require_ahead`);
- a global model is trained on once: the hashes of the models trained on are
  kept, a repeat is refused (a coordinator that changes the model to get
  around this pays a round each time: docs/security.md, what differencing
  still reveals);
- the ledger lives in the node's state and, on a deployed node, in a file
  under its cache folder, so neither an `advertise` or `abort` message nor a
  node restart clears it;
- every setting a training message carries equals the run's own value
  (`check_training_settings`), and the round's terms (run config, message
  settings, global model) become a digest the masks are bound to
  (`round_digest`, read by the SecAgg+ mod), so hospitals given other terms
  produce masks that do not cancel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.round_request import MalformedRequest, request_config, server_round
from medfed.client.settings import node_settings, run_config
from medfed.shared_models.atomic_files import durable_write
from medfed.shared_models.config import FLOAT_RANGES, ConfigError, RunConfig
from medfed.shared_models.protocol import Config, NodeConfig, Record
from medfed.shared_models.round_terms import model_digest, round_digest, run_config_digest

LEDGER_KEY = "medfed-ledger"  # context.state: this run's ledger
TERMS_KEY = "medfed-round-terms"  # context.state: the digest of the round being trained


class RoundRefused(ValueError):
    """A round this hospital will not train: a repeat, or terms that are not the run's.

    The text names only what the coordinator itself sent (rounds, keys, values).
    """


def ledger_file(context: Context) -> Path | None:
    """Where a deployed node keeps the run's ledger (under its cache folder); None in a
    simulation, whose nodes have no folder of their own and live as long as the run."""
    cache = node_settings(context).cache_dir
    return None if cache is None else cache / "ledger" / f"run-{context.run_id}.json"


class RoundLedger:
    """One run's ledger at this hospital: the last round trained and the models trained on
    (SHA-256 hex). What it keeps across runs is client/privacy/node_ledger.py's."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.file = ledger_file(context)
        kept = context.state.config_records.get(LEDGER_KEY)
        saved = self._read_file()
        memory = dict(kept) if kept is not None else {}
        self.trained = max(int(memory.get("trained", 0)), int(saved.get("trained", 0)))
        self.models = sorted(set(memory.get("models", [])) | set(saved.get("models", [])))

    def _read_file(self) -> dict[str, Any]:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError) as err:  # fail closed: an unreadable ledger trains nothing
            log(ERROR, "[medfed] the run ledger %s cannot be read: %s", self.file, err)
            raise RoundRefused("this node's run ledger cannot be read (see its log)") from None
        if not isinstance(data, dict):
            log(ERROR, "[medfed] the run ledger %s holds no JSON object", self.file)
            raise RoundRefused("this node's run ledger cannot be read (see its log)")
        return data

    def require_ahead(self, server_round: int) -> None:
        """Refuse any step of a round that is not after the last round trained."""
        if server_round <= self.trained:
            raise RoundRefused(
                f"round {server_round} is not after round {self.trained}, the last this "
                "hospital trained in this run: rounds only move forward"
            )

    def begin_training(self, server_round: int, model: bytes) -> None:
        """Record, before any training, that this round and model are taken."""
        self.require_ahead(server_round)
        if model.hex() in self.models:
            raise RoundRefused(
                f"round {server_round} sends a global model this hospital already trained on "
                "in this run (same SHA-256): a model is trained on once"
            )
        self.trained = server_round
        self.models.append(model.hex())
        self._save()

    def _save(self) -> None:
        values = {"trained": self.trained, "models": sorted(self.models)}
        self.context.state[LEDGER_KEY] = ConfigRecord(dict(values))
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            durable_write(self.file, json.dumps(values).encode())


def _expected_settings(cfg: RunConfig) -> dict[str, Any]:
    """What a training message of this run may carry besides the round: key -> the run's
    own value (None where the value is the coordinator's each round, but still bound)."""
    expected: dict[str, Any] = {}
    if cfg.strategy == "fedprox":
        expected[Config.PROXIMAL_MU] = cfg.proximal_mu
    if cfg.dp_mode == "client":  # Flower's DP wrapper sends the norm hospitals clip to
        expected[KEY_CLIPPING_NORM] = None if cfg.dp_adaptive else cfg.dp_clipping_norm
    if cfg.task == "bundle":  # the bundle handlers check it against the node's own copy
        expected[Config.BUNDLE_SHA256] = None
    return expected


def check_training_settings(config: Mapping[str, Any], cfg: RunConfig) -> int:
    """The round of a training message whose every setting is the run's own; RoundRefused
    naming the first that is missing, unknown to the run, or different from its value."""
    number = server_round(config)
    expected = _expected_settings(cfg)
    for key in sorted(set(config) - {Config.SERVER_ROUND}):
        if key not in expected:
            raise RoundRefused(
                f"the training message sets '{key}', which this run's config does not have "
                f"(strategy {cfg.strategy}, dp.mode {cfg.dp_mode})"
            )
    for key, value in expected.items():
        sent = config.get(key)
        if sent is None:
            raise RoundRefused(f"the training message lacks '{key}', which this run sets")
        if value is not None and sent != value:
            raise RoundRefused(
                f"the training message sets '{key}' = {sent!r}, but this run's config says "
                f"{value!r}: every hospital trains on the run's own settings"
            )
    norm = config.get(KEY_CLIPPING_NORM)
    low, high, _ = FLOAT_RANGES["dp_clipping_norm"]
    if norm is not None and not (
        isinstance(norm, float) and math.isfinite(norm) and low < norm <= high
    ):
        raise RoundRefused(
            f"'{KEY_CLIPPING_NORM}' = {norm!r}: expected a number in ({low}, {high}]"
        )
    return number


def round_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a plain round where the hospital requires secure aggregation, a repeated round,
    a model trained on before and settings that are not the run's; record the round in the
    ledger and its terms for the masking mod."""
    try:
        cfg = run_config(context)  # the handler runs under it too: parsed and checked once
    except ConfigError:  # the handler names it, after this hospital's own refusals below
        cfg = run_config(context, validate=False)
    required = node_settings(context).require_secure_aggregation
    if required and not cfg.secure_aggregation:
        raise RoundRefused(
            "this hospital trains only in runs with secure aggregation (its node setting "
            f"'{NodeConfig.REQUIRE_SECURE_AGGREGATION}'): set secure-aggregation = true"
        )
    config = request_config(msg)
    number = check_training_settings(config, cfg)
    arrays = msg.content.array_records.get(Record.ARRAYS)
    if arrays is None:
        raise MalformedRequest(f"the message has no '{Record.ARRAYS}' record")
    try:
        model = model_digest(arrays)
    except ValueError as error:
        raise MalformedRequest(str(error)) from error
    RoundLedger(context).begin_training(number, model)
    terms = round_digest(run_config_digest(context.run_config), config, model)
    context.state[TERMS_KEY] = ConfigRecord({"round": number, "digest": terms, "model": model})
    return call_next(msg, context)


def recorded_round(context: Context, number: int) -> tuple[bytes, bytes]:
    """(the digest of round `number`'s terms, of its global model), as `round_guard_mod`
    recorded them."""
    record = context.state.config_records.get(TERMS_KEY)
    if record is None or int(record["round"]) != number:
        raise RoundRefused(f"no terms were recorded for round {number} at this hospital")
    return bytes(record["digest"]), bytes(record["model"])
