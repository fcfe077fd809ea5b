"""Differential-privacy noise added at the hospital, inside the masked vector.

With the noise added by the coordinator (Flower's central DP), the coordinator
holds the noise-free sum of every secure round. A coordinator that sums
different sets of hospitals in different rounds (a slightly changed model each
time, so no hospital trains twice on one) can then difference the sums and
come close to one hospital's update. With `dp.noise` at the hospitals, each
hospital adds its share of the run's noise to its clipped update before
masking: N(0, (z C)^2 / n) for n hospitals, so the sum carries N(0, (z C)^2),
exactly what the coordinator would have added, and every sum, and so every
difference of sums, carries fresh noise the coordinator never sees.

Each hospital accounts its own epsilon against the coordinator in the worst
case, where every other hospital's noise is known (colluding): its update
alone is then released with noise multiplier z / sqrt(n), once per round it
sends. Google's dp-accounting (Renyi DP, as Flower's accountant) bounds the
composition; the ledger (round_guard.RoundLedger) keeps the multipliers
across the run and a node restart.
"""

from __future__ import annotations

import math

import numpy as np

from medfed.shared_models.config import RunConfig
from medfed.shared_models.noise import GaussianNoise


def noise_multiplier(cfg: RunConfig, participants: int) -> float:
    """The noise multiplier of one hospital's own noise: z / sqrt(n)."""
    return cfg.dp_noise_multiplier / math.sqrt(participants)


def add_own_noise(
    update: np.ndarray, cfg: RunConfig, clipping_norm: float, participants: int
) -> np.ndarray:
    """The clipped `update` plus this hospital's share of the run's Gaussian noise."""
    std = noise_multiplier(cfg, participants) * clipping_norm
    return GaussianNoise().add_to(update, std)


def own_epsilon(multipliers: list[float], delta: float) -> float:
    """Epsilon at `delta` of the updates this hospital sent, each with only its own noise."""
    from dp_accounting import dp_event  # late: only a hospital adding noise needs it
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    for multiplier in multipliers:
        accountant.compose(dp_event.GaussianDpEvent(multiplier))
    return float(accountant.get_epsilon(delta))
