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


def test_the_update_vector_is_the_difference_in_key_order_whatever_the_layout():
    import numpy as np
    from flwr.app import Array

    from medfed.shared_models.arrays import readable
    from medfed.shared_models.secagg.vector import difference, split

    rng = np.random.default_rng(0)
    before = {
        "b.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "a.bias": rng.normal(size=5).astype(np.float64),  # a float64 array too
        "c.kernel": np.asfortranarray(rng.normal(size=(2, 3, 2)).astype(np.float32)),
    }
    after = {k: v * 1.5 + 0.25 for k, v in before.items()}
    keys = ["b.weight", "a.bias", "c.kernel"]  # not sorted: the message's order rules
    views = [{k: readable(Array(np.asarray(d[k]))) for k in keys} for d in (after, before)]
    vector = difference(*views, keys)
    assert vector.dtype == np.float32 and vector.size == 12 + 5 + 12
    back = split(vector, {k: before[k].shape for k in keys})
    for key in keys:
        expected = after[key].astype(np.float32) - before[key].astype(np.float32)
        np.testing.assert_array_equal(back[key], expected)


def test_a_mask_is_the_seed_s_keystream_across_chunks_and_cancels():
    import os

    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from medfed.shared_models.secagg.primitives import MaskStream, Scratch

    seed, size = os.urandom(32), 2 * Scratch.CHUNK_VALUES + 7  # two chunk boundaries
    keystream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    expected = np.frombuffer(keystream.update(bytes(4 * size)), dtype="<u4")
    target = np.arange(size, dtype=np.uint32)
    MaskStream(seed).apply(target, True, Scratch())
    np.testing.assert_array_equal(target, np.arange(size, dtype=np.uint32) + expected)
    # both ends read one stream array by array: the same values in two calls
    stream, scratch = MaskStream(seed), Scratch()
    head, tail = target[:1000], target[1000:]
    stream.apply(head, False, scratch)
    stream.apply(tail, False, scratch)
    np.testing.assert_array_equal(target, np.arange(size, dtype=np.uint32))


def test_the_update_vector_refuses_arrays_that_do_not_match_in_shape():
    """`after[k] - before[k]` of arrays of different shapes is no update: NumPy would
    broadcast a one-value array silently (flattening both sides first refused it)."""
    import numpy as np

    from medfed.shared_models.secagg.vector import difference

    after = {"w": np.ones(5, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    for before_w in (np.zeros(1, dtype=np.float32), np.zeros((5, 1), dtype=np.float32)):
        with pytest.raises(ValueError, match="'w'"):
            difference(after, {"w": before_w, "b": np.zeros(2, dtype=np.float32)}, ["w", "b"])
