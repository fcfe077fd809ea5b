"""SecAgg+ building blocks: Shamir sharing and the fixed-point encoding of updates."""

from __future__ import annotations

import itertools

import pytest

from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.quantize import check_ranges


def test_shamir_rebuilds_from_any_threshold_subset_only():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    two = {1: shares[1], 2: shares[2]}
    with pytest.raises(ValueError, match="inconsistent"):  # below threshold: not the secret
        shamir.combine(two, 2)


@pytest.mark.parametrize(
    ("clip", "bits"), [(0.0, 30), (-1.0, 30), (float("nan"), 30), (1.0, 32), (1.0, 4)]
)
def test_bad_quantisation_ranges_are_refused(clip, bits):
    with pytest.raises(ValueError):
        check_ranges(clip, bits, 5)
