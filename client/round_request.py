"""What the coordinator asks of this hospital in one message, read with bounds.

The coordinator's `config` record is outside input at the site: a missing
record, a round number that is text or a proximal term that is NaN used to
surface as a KeyError or ValueError in the middle of a handler. Each value
is read here, once, and a bad one is refused with MalformedRequest, whose
text names the key and the value the coordinator itself sent (no site data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from medfed.shared_models.config import FLOAT_RANGES, INT_RANGES
from medfed.shared_models.protocol import SITE_NAME, Config, Record


class MalformedRequest(ValueError):
    """A message from the coordinator that this hospital cannot act on."""


@dataclass(frozen=True)
class RoundSettings:
    """A training or evaluation message's settings."""

    server_round: int
    proximal_mu: float


def request_config(msg: Message) -> Mapping[str, Any]:
    """The message's `config` record (a message without one is malformed)."""
    config = msg.content.config_records.get(Record.CONFIG)
    if config is None:
        raise MalformedRequest(f"the message has no '{Record.CONFIG}' record")
    return config


def round_settings(msg: Message) -> RoundSettings:
    """The round number (0 when absent) and FedProx's proximal term (0 when absent)."""
    config = request_config(msg)
    mu = config.get(Config.PROXIMAL_MU, 0.0)
    low, high, _ = FLOAT_RANGES["proximal_mu"]
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not low <= mu <= high:
        _bad(Config.PROXIMAL_MU, mu, f"a number in [{low}, {high}]")
    return RoundSettings(server_round(config, required=False), float(mu))


def cross_site_model(msg: Message) -> str | None:
    """The site whose local model a cross-site evaluation message carries; None for the
    global model (the round loop's own evaluation)."""
    config = request_config(msg)
    if Config.CROSS_SITE_MODEL not in config:
        return None
    name = config[Config.CROSS_SITE_MODEL]
    if not (isinstance(name, str) and SITE_NAME.fullmatch(name)):
        _bad(Config.CROSS_SITE_MODEL, name, "a site name")
    return str(name)


def server_round(config: Mapping[str, Any], required: bool = True) -> int:
    """The message's round: a non-negative integer within the run's longest."""
    if Config.SERVER_ROUND not in config and not required:
        return 0
    return integer(config, Config.SERVER_ROUND, 0, INT_RANGES["num_server_rounds"][1])


def integer(config: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """An integer setting in `low..high` (a float holding a whole number counts)."""
    value = config.get(key)
    whole = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, int) or whole):
        _bad(key, value, f"an integer in {low}..{high}")
    if not low <= value <= high:
        _bad(key, value, f"an integer in {low}..{high}")
    return int(value)


def node_names(config: Mapping[str, Any], key: str) -> list[str]:
    """A list of node ids as text (the SecAgg+ survivors and dropped)."""
    value = config.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _bad(key, value, "a list of node ids")
    return list(value)


def _bad(key: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise MalformedRequest(f"'{key}' = {shown}: expected {expected}")
