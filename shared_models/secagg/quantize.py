"""Fixed-point encoding of weighted model updates into the mask group Z / 2**32.

Each hospital sends round(p_i * clip(update_i) * scale) where p_i is its share
of the aggregation weight (the p_i sum to at most 1). The sum over hospitals
is then bounded by 2**(bits-1) - 1 plus half a unit per hospital of rounding,
which `check_ranges` proves fits a signed 32-bit value: the modulus can never
wrap silently, however the example counts are distributed.
"""

from __future__ import annotations

import math

import numpy as np

MODULUS_BITS = 32
MIN_BITS, MAX_BITS = 8, 31


def check_ranges(clipping_range: float, bits: int, participants: int) -> None:
    """Raise ValueError naming the bad value unless the encoded sum cannot overflow."""
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise ValueError(f"clipping range must be a positive number, got {clipping_range!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"quantization bits must be {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    worst = (2 ** (bits - 1) - 1) + participants / 2
    if participants < 1 or worst >= 2 ** (MODULUS_BITS - 1):
        raise ValueError(
            f"{participants} participants at {bits} bits could overflow the 2**32 modulus"
        )


def scale(clipping_range: float, bits: int) -> float:
    return (2 ** (bits - 1) - 1) / clipping_range


def check_fraction(fraction: float) -> None:
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"aggregation weight fraction must be in (0, 1], got {fraction!r}")


def encode(
    update: np.ndarray, fraction: float, clipping_range: float, bits: int
) -> tuple[np.ndarray, int]:
    """(uint32 encoding of fraction * clipped update, number of values clipped).

    float32 arithmetic suffices: its relative error (6e-8) is the update's own
    precision, and |encoded| < 2**30 always fits the int32 it is cast to.
    """
    check_fraction(fraction)
    values = np.asarray(update, dtype=np.float32).ravel()
    if not np.isfinite(values).all():
        raise ValueError("the update contains NaN or infinite values")
    encoded = np.clip(values, -clipping_range, clipping_range)
    clipped = int(np.count_nonzero(encoded != values))
    encoded *= np.float32(fraction * scale(clipping_range, bits))
    np.rint(encoded, out=encoded)
    return encoded.astype(np.int32).view(np.uint32), clipped


def decode(total: np.ndarray, fraction_sum: float, clipping_range: float, bits: int) -> np.ndarray:
    """The weighted mean update from the unmasked sum of encodings (float32)."""
    if not fraction_sum > 0:
        raise ValueError("no aggregation weight survived the round")
    signed = np.ascontiguousarray(total, dtype=np.uint32).view(np.int32).astype(np.float32)
    signed *= np.float32(1 / (scale(clipping_range, bits) * fraction_sum))
    return signed
