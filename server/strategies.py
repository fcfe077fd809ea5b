"""Flower strategies by run-config name."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from medfed.shared_models.config import RunConfig


def build_strategy(cfg: RunConfig) -> Strategy:
    """FedAvg or FedProx (the proximal term is added by the hospitals' training pass).

    Node minimums equal the quorum; medfed waits for them itself with a bound
    (Flower's sampler would wait forever).
    """
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
    }
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    return FedAvg(**common)
