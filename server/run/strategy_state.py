"""What a strategy and the coordinator's random streams carry from one round to the next
(sampling and initialisation; never the DP noise, which no checkpoint holds).

Resuming a run from its weights alone would restart FedAdam's moments,
FedAvgM's momentum, an adaptive clipping norm and the privacy accountant's
ledger: the resumed run would differ from the one interrupted and, under
DP, report a smaller epsilon than was spent. Flower's strategies keep that
state in plain attributes (its accountant offers `state_dict`), so it is
captured here as tensors and plain values that `torch.load(weights_only=True)`
reads back: nothing in a checkpoint is unpickled as code.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

# The attributes Flower's strategies change between rounds (FedOpt: m_t, v_t; FedAvgM:
# momentum_vector; adaptive DP clipping: clipping_norm). Arrays sent each round are
# re-derived from the checkpoint's arrays by configure_train.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")


class StateMismatch(ValueError):
    """A checkpoint's strategy state does not fit this run's strategy."""


def layers(strategy: Strategy) -> list[object]:
    """The strategy and every strategy it wraps (DP wrappers, GivenMean), outermost first."""
    chain: list[object] = [strategy]
    while True:
        inner = vars(chain[-1]).get("strategy") or vars(chain[-1]).get("inner")
        if inner is None:
            return chain
        chain.append(inner)


def kind(layer: object) -> str:
    """A strategy layer's kind in a checkpoint: the Flower class it is or extends (medfed's
    DP wrappers are Flower's with other noise), else its own class name."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("flwr."):
            return cls.__name__
    return type(layer).__name__


def capture(strategy: Strategy) -> dict[str, Any]:
    """The strategy's round-to-round state and the coordinator's random streams."""
    captured = []
    for layer in layers(strategy):
        values = {
            name: _saveable(vars(layer)[name])
            for name in STATE_ATTRIBUTES
            if vars(layer).get(name) is not None
        }
        captured.append({"type": kind(layer), "values": values})
    accountant = _accountant(strategy)
    return {
        "layers": captured,
        "accountant": json.dumps(accountant.state_dict()) if accountant is not None else "",
        "random": _random_state(),
    }


def restore(strategy: Strategy, state: dict[str, Any], lost_releases: int = 0) -> None:
    """Put `capture`'s output back into a freshly built strategy of the same kind.

    `lost_releases`: noisy models released after the checkpoint was taken;
    they are added to the privacy ledger. The DP noise is in none of the
    random streams restored here (strategies.UnpredictableNoise draws it from
    the operating system's entropy, never saved), so a resumed round draws new
    noise: two releases with one noise would reveal the difference of the
    updates behind them.
    """
    chain = layers(strategy)
    saved = state.get("layers", [])
    kinds = [kind(layer) for layer in chain]
    if [entry.get("type") for entry in saved] != kinds:
        raise StateMismatch(
            f"the checkpoint's strategy {[e.get('type') for e in saved]} is not this run's {kinds}"
        )
    for layer, entry in zip(chain, saved, strict=True):
        for name, value in entry["values"].items():
            if name not in STATE_ATTRIBUTES:
                raise StateMismatch(f"unknown strategy state {name!r}")
            setattr(layer, name, _restored(value))
    _restore_ledger(strategy, state.get("accountant", ""), lost_releases)
    _set_random_state(state["random"])


def population(state: dict[str, Any]) -> int | None:
    """The hospital count the checkpoint's privacy accountant was built for (None: none)."""
    if not state.get("accountant"):
        return None
    return int(json.loads(state["accountant"])["config"]["population_size"])


def _restore_ledger(strategy: Strategy, saved: str, lost_releases: int) -> None:
    accountant = _accountant(strategy)
    if (accountant is None) != (not saved):
        raise StateMismatch("the checkpoint's privacy accounting differs from this run's")
    if accountant is None:
        return
    try:
        accountant.load_state_dict(json.loads(saved))
    except (ValueError, TypeError, KeyError) as err:
        raise StateMismatch(f"the privacy accountant's ledger does not fit: {err}") from err
    if lost_releases:  # released as Flower's DP wrapper composes a round's release
        wrapper = next(layer for layer in layers(strategy) if vars(layer).get("accountant"))
        event = GaussianPrivacyEvent(
            noise_multiplier=wrapper.noise_multiplier,
            sample_size=wrapper.num_sampled_clients,
            population_size=accountant.config.population_size,
        )
        accountant.compose(event, lost_releases)


def _accountant(strategy: Strategy) -> Any:
    found = (vars(layer).get("accountant") for layer in layers(strategy))
    return next((accountant for accountant in found if accountant is not None), None)


def _saveable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: torch.from_numpy(np.array(array)) for key, array in value.items()}
    if isinstance(value, list):
        return [torch.from_numpy(np.array(array)) for array in value]
    return float(value)


def _restored(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: tensor.numpy() for key, tensor in value.items()}
    if isinstance(value, list):
        return [tensor.numpy() for tensor in value]
    return float(value)


def _random_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }


def _set_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
