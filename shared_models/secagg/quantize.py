"""Fixed-point encoding of self-weighted model updates into the mask group Z / 2**32.

Each hospital weights its own update: r_i = min(examples, max weight) / max
weight, a public bound, so no coordinator can choose whom the "aggregate"
consists of. It sends round(r_i * clip(update_i) * scale) and, as one more
value, r_i in fixed point; only the sums of both are ever unmasked, and their
quotient is the weighted mean. With scale = (2**(bits-1) - 1) / (range * n)
the n encodings sum to at most 2**(bits-1) - 1 plus half a unit each of
rounding, which `check_ranges` proves fits a signed 32-bit value: the modulus
never wraps silently, however the example counts are distributed.
(Flower's SecAgg+ encodes the weight the same way, against its `max_weight`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
MIN_BITS, MAX_BITS = 8, 31
# After the update's values, every upload carries two integers: the hospital's own weight,
# and how many of its values the clipping range cut (only their sum over the hospitals is
# ever unmasked: a count per hospital would be a statistic of its own update).
WEIGHT_SLOT, CLIPPED_SLOT = -2, -1
EXTRA_SLOTS = 2


@dataclass(frozen=True)
class Encoding:
    """How a run encodes updates: from the run's config, alike at every site and at the
    coordinator (and bound into every share ciphertext, so no hospital can be given
    terms of its own)."""

    clipping_range: float
    bits: int
    max_weight: float
    equal_weights: bool  # under differential privacy every hospital weighs the same

    def terms(self, participants: int, threshold: int) -> str:
        """The round's terms as text, for the share ciphertexts' authenticated data."""
        return (
            f"participants={participants}|threshold={threshold}|range={self.clipping_range!r}|"
            f"bits={self.bits}|max-weight={self.max_weight!r}|equal={self.equal_weights}"
        )


def check_ranges(clipping_range: float, bits: int, participants: int) -> None:
    """Raise ValueError naming the bad value unless the encoded sums cannot overflow."""
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise ValueError(f"clipping range must be a positive number, got {clipping_range!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"quantization bits must be {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    worst = (2 ** (bits - 1) - 1) + participants / 2
    if participants < 1 or worst >= 2 ** (MODULUS_BITS - 1):
        raise ValueError(
            f"{participants} participants at {bits} bits could overflow the 2**32 modulus"
        )


def scale(clipping_range: float, bits: int, participants: int) -> float:
    """Units per update value: n full-weight hospitals at the clipping bound fill the range."""
    return (2 ** (bits - 1) - 1) / (clipping_range * participants)


def weight_scale(participants: int) -> int:
    """Units of the weight value: n full weights, rounded, stay below 2**31."""
    return (2 ** (MODULUS_BITS - 1) - 1 - participants) // participants


def weight_units(ratio: float, participants: int) -> int:
    """The fixed-point value of a hospital's weight ratio, as it puts it in its upload (the
    coordinator computes it from the hospital's clear weight to check the unmasked sum)."""
    return round(ratio * weight_scale(participants))


def encoded_weight(weight: float, encoding: Encoding, participants: int) -> int:
    """The fixed-point weight a hospital reporting `weight` (its clear aggregation weight)
    encodes: its own ratio, or 1 for everyone under equal weights."""
    ratio = 1.0 if encoding.equal_weights else weight_ratio(weight, encoding.max_weight)
    return weight_units(ratio, participants)


def weight_ratio(examples: float, max_weight: float) -> float:
    """A hospital's own weight in (0, 1]: its example count against the public maximum."""
    if not (math.isfinite(examples) and examples > 0):
        raise ValueError(f"aggregation weight must be a positive number, got {examples!r}")
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"maximum weight must be a positive number, got {max_weight!r}")
    return min(float(examples), float(max_weight)) / float(max_weight)


def clipped_cap(participants: int) -> int:
    """The most clipped values one upload counts: n of them still fit a signed 32-bit sum."""
    return (2 ** (MODULUS_BITS - 1) - 1) // participants


def encode(
    update: np.ndarray, ratio: float, clipping_range: float, bits: int, participants: int
) -> tuple[np.ndarray, int]:
    """(uint32 encoding of ratio * clipped update, then of ratio, then of the number of values
    clipped; that number, for the hospital's own log).

    float32 arithmetic suffices: its relative error (6e-8) is the update's own
    precision, and |encoded| < 2**30 always fits the int32 it is cast to.
    """
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"weight ratio must be in (0, 1], got {ratio!r}")
    check_ranges(clipping_range, bits, participants)
    values = np.asarray(update, dtype=np.float32).ravel()
    if not np.isfinite(values).all():
        raise ValueError("the update contains NaN or infinite values")
    encoded = np.empty(values.size + EXTRA_SLOTS, dtype=np.float32)
    encoded[-EXTRA_SLOTS:] = 0.0  # the weight's and the count's places, set in integers below
    body = encoded[:-EXTRA_SLOTS]
    np.clip(values, -clipping_range, clipping_range, out=body)
    clipped = int(np.count_nonzero(body != values))
    body *= np.float32(ratio * scale(clipping_range, bits, participants))
    np.rint(encoded, out=encoded)
    as_int = encoded.astype(np.int32)
    as_int[WEIGHT_SLOT] = weight_units(ratio, participants)
    as_int[CLIPPED_SLOT] = min(clipped, clipped_cap(participants))
    return as_int.view(np.uint32), clipped


def decode(
    total: np.ndarray, encoding: Encoding, participants: int, contributors: int
) -> tuple[np.ndarray, float, int]:
    """The weighted mean update (float32), the sum of weight ratios and the number of values
    the hospitals clipped, from the unmasked sum of `contributors` uploads; ValueError when
    it cannot be a sum of honest encodings.

    Masks cancel additively, so a hospital that adds anything to its upload
    moves the sum. What an honest sum must satisfy is checked: each weight is
    in [1 / max weight, 1] (exactly 1 under equal weights), and a weighted mean
    of values clipped to the range stays within it (plus half a unit of
    rounding per hospital). Bias within those bounds cannot be told apart from
    training (docs/security.md).
    """
    signed = np.ascontiguousarray(total, dtype=np.uint32).view(np.int32)
    units, full = int(signed[WEIGHT_SLOT]), weight_scale(participants)
    lowest = contributors * math.floor(full / encoding.max_weight)
    highest = contributors * full
    if not (units == highest if encoding.equal_weights else lowest <= units <= highest):
        raise ValueError(
            f"the unmasked weights of {contributors} hospitals sum to {units / full:g}: not "
            "a sum of their own weights (a hospital's upload was not a valid encoding, or "
            "the masks did not cancel)"
        )
    ratio_sum = units / full
    unit = scale(encoding.clipping_range, encoding.bits, participants)
    mean = signed[:-EXTRA_SLOTS].astype(np.float32)
    mean *= np.float32(1 / (unit * ratio_sum))
    bound = encoding.clipping_range * (1 + 1e-6) + contributors / (2 * unit * ratio_sum)
    largest = float(np.abs(mean).max()) if mean.size else 0.0
    if largest > bound:
        raise ValueError(
            f"the unmasked mean reaches {largest:g}, beyond the clipping range "
            f"{encoding.clipping_range:g}: a hospital's upload was not a valid encoding"
        )
    clipped = int(signed[CLIPPED_SLOT])
    if not 0 <= clipped <= contributors * clipped_cap(participants):
        raise ValueError(f"the unmasked count of clipped values is {clipped}: not a valid sum")
    return mean, ratio_sum, clipped
