"""A training round's terms as digests the coordinator and every hospital compute alike.

Everything that shapes a hospital's update, its weight or its encoding must be
the same for every hospital of a round: the run's config (learning rate, local
epochs, augmentation, clipping, ...), the training message's own settings
(the round, FedProx's proximal term, the DP clipping norm) and the global
model it starts from. A coordinator that gave one hospital other terms than
the rest (mu = 1000 for all but a victim, a model whose gradients vanish)
could isolate the victim's update inside an honest-looking sum. The digests
below are bound into the round: the run config's into every share ciphertext
(hospitals given other configs cannot open each other's shares), the round's
into the pairwise masks (hospitals given other settings or models derive masks
that do not cancel), and the model's into the hospital's own record of the
global models it trained on (client/privacy/round_guard.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord


def _canonical(value: Any) -> bytes:
    """One byte string per value: keys sorted, floats as Python writes them (both ends
    receive the same types from Flower, so the same text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def run_config_digest(run_config: Mapping[str, Any]) -> bytes:
    """SHA-256 of the run's whole config, as Flower hands it to both apps."""
    return hashlib.sha256(b"medfed-run-config|" + _canonical(dict(run_config))).digest()


def model_digest(arrays: ArrayRecord) -> bytes:
    """SHA-256 of a model as a hospital's network loads it: each array by name, shape and
    values, floats as float32 and integers as int64 (the network's own types). Hashing the
    bytes as sent let the same model, sent as float64 (or in another order), pass for a
    new one and train bit for bit again: a second sum over it (attack round 2)."""
    digest = hashlib.sha256(b"medfed-model|")
    for name in sorted(arrays):
        values = np.asarray(arrays[name].numpy())
        kind = "<f4" if values.dtype.kind == "f" else "<i8" if values.dtype.kind in "biu" else None
        if kind is None:
            raise ValueError(f"model array '{name}' has type {values.dtype}: not a real number")
        loaded = np.ascontiguousarray(values, kind)
        digest.update(_canonical([name, kind, list(loaded.shape)]))
        digest.update(loaded.tobytes())
    return digest.digest()


def round_digest(run_config: bytes, message_config: Mapping[str, Any], model: bytes) -> bytes:
    """SHA-256 of one training round's terms: the run config's digest, every setting of
    the training message and the global model's digest."""
    return hashlib.sha256(
        b"medfed-round|" + run_config + _canonical(dict(message_config)) + model
    ).digest()
