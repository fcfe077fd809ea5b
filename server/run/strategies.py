"""Flower strategies by run-config name, wrapped for differential privacy when asked.

Node minimums equal the quorum; medfed waits for them itself with a bound
(Flower's sampler would wait forever). Under secure aggregation the mean is
computed once, by unmasking: `GivenMean` hands the strategy that mean as
one reply, so only its server step (FedAdam's moments, FedAvgM's momentum,
DP noise) runs on top. The exception is a run whose privacy Flower's RDP
accountant bounds: the accountant accepts FedAvg's own aggregation only.

Flower's DP wrappers are used as they are except for where their noise comes
from (`UnpredictableNoise`): NumPy's global generator, which a run seeds with
its public `seed`, is replaced by a generator keyed from the operating system;
under `dp.noise` at the hospitals they add none (it is in the unmasked sum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower_strategies
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from medfed.server.run.hidden_counts import mean_of_metrics
from medfed.shared_models.config import FLOWER_STRATEGY_CLASSES, RunConfig
from medfed.shared_models.noise import GaussianNoise
from medfed.shared_models.protocol import Metric

# Each configurable strategy's Flower class, by the name the run config lists it under.
FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    name: getattr(flower_strategies, cls) for name, cls in FLOWER_STRATEGY_CLASSES.items()
}


@dataclass
class RunStrategy:
    """This run's Flower strategy and what its privacy accounting can report."""

    flower: Strategy
    accounted: bool = False
    unaccounted_reason: str = ""

    def epsilon(self) -> float | None:
        """Cumulative epsilon at the configured delta, where Flower's accountant applies."""
        if not self.accounted:
            return None
        spent = self.flower.privacy_spent()  # type: ignore[attr-defined]
        return float(spent.epsilon) if spent and spent.num_releases else None


def dp_noise_ratio(noise_multiplier: float, values: int, hospitals: int) -> float:
    """How many times the norm of the DP noise added to a round's mean exceeds the largest
    update that mean can carry.

    Flower adds noise of standard deviation noise_multiplier x clipping-norm / hospitals to
    each of the mean's `values` values, whose norm is at most the clipping norm: the norm
    ratio is noise_multiplier x sqrt(values) / hospitals, whatever the clipping norm.
    Above 1 every round adds more noise than any round's training can move the model.
    """
    return noise_multiplier * math.sqrt(values) / max(hospitals, 1)


class GivenMean(Strategy):
    """A weighted-mean strategy fed the mean secure aggregation already computed.

    Every survivor's reply of a secure round carries the same unmasked mean
    (Flower's DP wrapper counts the replies against the sampled hospitals).
    Averaging those copies would compute the mean a second time; this hands
    the inner strategy one of them instead, so only its server step runs,
    and aggregates the survivors' clear metrics as the inner strategy would.
    """

    def __init__(self, inner: FedAvg) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:  # weighted_by_key, current_arrays, ...
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        if not replies:
            return None, None
        arrays, _ = self.inner.aggregate_train(server_round, replies[:1])
        metrics = self.inner.train_metrics_aggr_fn(
            [reply.content for reply in replies], self.inner.weighted_by_key
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class UnpredictableNoise:
    """Noise for Flower's DP wrappers that nobody can regenerate (mixed in before them).

    Flower draws the Gaussian noise, and the adaptive clipping's noisy count,
    from NumPy's global generator; a run seeds that with its public `seed`, so
    anyone holding the released model could subtract the noise. Here every
    draw comes from `GaussianNoise` (256 bits from the operating system, never
    saved). With `noise_at_hospitals` the hospitals already put the noise in
    the unmasked sum, and nothing is added twice; the accountant composes the
    release either way (the sum's noise is the same).
    """

    noise_at_hospitals = False

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        if self.noise_at_hospitals:
            log(INFO, "[medfed] DP noise: added by the hospitals inside the masked sum")
            return aggregated_arrays
        std = compute_stdv(
            self.noise_multiplier,  # type: ignore[attr-defined]
            self.clipping_norm,  # type: ignore[attr-defined]
            self.num_sampled_clients,  # type: ignore[attr-defined]
        )
        noise = GaussianNoise()
        log(INFO, "[medfed] DP noise: std %.4g added by the coordinator", std)
        return ArrayRecord(
            {k: Array(noise.add_to(v.numpy(), std)) for k, v in aggregated_arrays.items()}
        )

    def _noisy_fraction(self, count: int, total: int) -> float:
        """Adaptive clipping: the clipped count with its Gaussian noise, over the total."""
        std = self.clipped_count_stddev  # type: ignore[attr-defined]
        return float(count + std * GaussianNoise().standard(1)[0]) / float(total)


class ClientSideFixedClipping(UnpredictableNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping with unpredictable noise."""


class ServerSideFixedClipping(UnpredictableNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with unpredictable noise."""


class ClientSideAdaptiveClipping(UnpredictableNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with unpredictable noise."""


class ServerSideAdaptiveClipping(UnpredictableNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with unpredictable noise."""


def sampled_per_round(cfg: RunConfig, connected: int) -> int:
    """How many hospitals Flower's sampler picks each round (FedAvg.configure_train)."""
    return max(int(connected * cfg.fraction_train), cfg.min_nodes)


def base_strategy(cfg: RunConfig) -> FedAvg:
    """The configured Flower strategy, weighting replies by medfed's weight metric and
    averaging their metrics without the counts (`hidden_counts.mean_of_metrics`)."""
    options = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
        "weighted_by_key": Metric.WEIGHT,
        # Flower's weighted mean would average a hiding site's -1 marker into the counts
        "train_metrics_aggr_fn": mean_of_metrics,
        "evaluate_metrics_aggr_fn": mean_of_metrics,
    }
    if cfg.strategy == "fedprox":
        options["proximal_mu"] = cfg.proximal_mu
    if cfg.strategy == "krum":
        options["num_malicious_nodes"] = cfg.krum_byzantine
    if cfg.server_lr:
        options["server_learning_rate" if cfg.strategy == "fedavgm" else "eta"] = cfg.server_lr
    return FLOWER_STRATEGIES[cfg.strategy](**options)


def build_strategy(cfg: RunConfig, connected: int) -> RunStrategy:
    """The configured strategy, inside Flower's DP wrapper when dp.mode is on."""
    base = base_strategy(cfg)
    inner: Strategy = GivenMean(base) if cfg.secure_aggregation else base
    if cfg.dp_mode == "off":
        return RunStrategy(inner, unaccounted_reason="differential privacy is off")
    sampled = sampled_per_round(cfg, connected)
    if cfg.dp_adaptive:
        return _adaptive_clipping(cfg, inner, sampled)
    reason = _accounting_obstacle(cfg, base)
    accountant = None if reason else _accountant(cfg, max(connected, sampled))
    if accountant is not None:
        # Flower's accountant accepts FedAvg's own aggregation only: in a secure run
        # FedAvg then averages the survivors' identical copies of the mean, which
        # returns the mean (under DP every weight is 1).
        inner = base
    wrapper = ClientSideFixedClipping if cfg.dp_mode == "client" else ServerSideFixedClipping
    strategy = wrapper(
        inner, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled, accountant=accountant
    )
    strategy.noise_at_hospitals = cfg.noise_at_hospitals
    return RunStrategy(strategy, accounted=accountant is not None, unaccounted_reason=reason)


def _adaptive_clipping(cfg: RunConfig, inner: Strategy, sampled: int) -> RunStrategy:
    wrapper = ClientSideAdaptiveClipping if cfg.dp_mode == "client" else ServerSideAdaptiveClipping
    # Andrew et al. suggest sampled/20 for the clipped-count noise; with a
    # handful of hospitals that is below noise-multiplier/2, which leaves no
    # noise for the update itself, so never go below the noise multiplier.
    count_stddev = max(sampled / 20, cfg.dp_noise_multiplier) or None
    strategy = wrapper(
        inner,
        cfg.dp_noise_multiplier,
        sampled,
        initial_clipping_norm=cfg.dp_clipping_norm,
        clipped_count_stddev=count_stddev,
    )
    return RunStrategy(
        strategy,
        unaccounted_reason="Flower's accountant does not cover adaptive clipping "
        "(the clipping norm itself is a noisy release)",
    )


def _accountant(cfg: RunConfig, population: int) -> RdpAccountant:
    """Flower's RDP accountant for one release per round over `population` hospitals."""
    return RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.dp_delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


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
