"""Flower strategies by run-config name, wrapped for differential privacy when asked."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from medfed.shared_models.config import RunConfig

# Hospitals send this metric with every reply: their example count, or 1 under
# differential privacy, whose noise scale assumes an unweighted mean.
WEIGHT_KEY = "aggregation-weight"

_STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


@dataclass
class Federation:
    """The strategy for this run and what its privacy accounting can report."""

    strategy: Strategy
    accounted: bool = False
    unaccounted_reason: str = ""

    def epsilon(self) -> float | None:
        """Cumulative epsilon at the configured delta, where Flower's accountant applies."""
        if not self.accounted:
            return None
        spent = self.strategy.privacy_spent()  # type: ignore[attr-defined]
        return float(spent.epsilon) if spent and spent.num_releases else None


def sampled_per_round(cfg: RunConfig, connected: int) -> int:
    """How many hospitals Flower's sampler picks each round (FedAvg.configure_train)."""
    return max(int(connected * cfg.fraction_train), cfg.min_nodes)


def build_strategy(cfg: RunConfig, connected: int) -> Federation:
    """The configured Flower strategy, inside Flower's DP wrapper when dp.mode is on.

    Node minimums equal the quorum; medfed waits for them itself with a bound
    (Flower's sampler would wait forever).
    """
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
        "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.strategy == "fedprox":
        common["proximal_mu"] = cfg.proximal_mu
    base = _STRATEGIES[cfg.strategy](**common)
    if cfg.dp_mode == "off":
        return Federation(base, unaccounted_reason="differential privacy is off")
    sampled = sampled_per_round(cfg, connected)
    if cfg.dp_adaptive:
        wrapper = (
            DifferentialPrivacyClientSideAdaptiveClipping
            if cfg.dp_mode == "client"
            else DifferentialPrivacyServerSideAdaptiveClipping
        )
        # Andrew et al. suggest sampled/20 for the clipped-count noise; with a
        # handful of hospitals that is below noise-multiplier/2, which leaves no
        # noise for the update itself, so never go below the noise multiplier.
        count_stddev = max(sampled / 20, cfg.dp_noise_multiplier) or None
        strategy = wrapper(
            base,
            cfg.dp_noise_multiplier,
            sampled,
            initial_clipping_norm=cfg.dp_clipping_norm,
            clipped_count_stddev=count_stddev,
        )
        return Federation(
            strategy,
            unaccounted_reason="Flower's accountant does not cover adaptive clipping "
            "(the clipping norm itself is a noisy release)",
        )
    reason = _accounting_obstacle(cfg, base)
    accountant = None
    if not reason:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=cfg.dp_delta,
                population_size=max(connected, sampled),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if cfg.dp_mode == "client"
        else DifferentialPrivacyServerSideFixedClipping
    )
    strategy = wrapper(
        base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled, accountant=accountant
    )
    return Federation(strategy, accounted=accountant is not None, unaccounted_reason=reason)


def _accounting_obstacle(cfg: RunConfig, base: Strategy) -> str:
    """Why Flower's RDP accountant cannot bound this run's privacy loss ('' if it can)."""
    if cfg.dp_noise_multiplier <= 0:
        return "dp.noise-multiplier is 0: no noise, no privacy guarantee"
    if type(base).aggregate_train is not FedAvg.aggregate_train:
        return (
            f"strategy {cfg.strategy} changes the aggregate after averaging; Flower's "
            "accountant covers FedAvg-style aggregation only"
        )
    return ""
