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

from flwr.app import ArrayRecord


def _canonical(value: Any) -> bytes:
    """One byte string per value: keys sorted, floats as Python writes them (both ends
    receive the same types from Flower, so the same text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def run_config_digest(run_config: Mapping[str, Any]) -> bytes:
    """SHA-256 of the run's whole config, as Flower hands it to both apps."""
    return hashlib.sha256(b"medfed-run-config|" + _canonical(dict(run_config))).digest()


def model_digest(arrays: ArrayRecord) -> bytes:
    """SHA-256 of a model message's arrays: names, types, shapes and bytes, in order."""
    digest = hashlib.sha256(b"medfed-model|")
    for name, array in arrays.items():
        digest.update(_canonical([name, array.dtype, list(array.shape), array.stype]))
        digest.update(len(array.data).to_bytes(8, "little"))
        digest.update(array.data)
    return digest.digest()


def round_digest(run_config: bytes, message_config: Mapping[str, Any], model: bytes) -> bytes:
    """SHA-256 of one training round's terms: the run config's digest, every setting of
    the training message and the global model's digest."""
    return hashlib.sha256(
        b"medfed-round|" + run_config + _canonical(dict(message_config)) + model
    ).digest()
