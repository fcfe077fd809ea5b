"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Written here because `cryptography` has no secret sharing and the few
packages that do either work in GF(2**128) (too small for a 32-byte key
without splitting) or are unmaintained. The arithmetic is textbook and the
randomness comes from `secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1  # a Mersenne prime; larger than every 256-bit secret
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` at the x-coordinates `xs`; any `threshold` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and {len(xs)} shares")
    if len(set(xs)) != len(xs) or not all(type(x) is int and 0 < x < PRIME for x in xs):
        # x = 0 (or a multiple of the prime) would hand out the secret itself
        raise ValueError("x-coordinates must be distinct integers in 1..PRIME-1")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def interpolate(shares: Mapping[int, bytes], threshold: int, x: int) -> int:
    """The sharing polynomial at `x`, from the first `threshold` shares (Lagrange)."""
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to rebuild a secret, got {len(shares)}")
    points = [(xi, int.from_bytes(y, "big")) for xi, y in list(shares.items())[:threshold]]
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (x - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (x -> y), by Lagrange at x = 0."""
    secret = interpolate(shares, threshold, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the rebuilt value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
