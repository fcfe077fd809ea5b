"""Gaussian noise for differential privacy that nobody can predict.

Flower's DP wrappers draw their noise from NumPy's global generator, which a
run seeds with its `seed` (default 0, sent to every hospital, written to the
audit log): regenerating the draws from seed 0 and subtracting them gave the
noise-free aggregate exactly. Noise must come from a generator nobody else
can run: here every `GaussianNoise` is keyed with 256 bits from the operating
system, never from a setting, never saved in a checkpoint, so a resumed run
draws afresh.

Written by hand because NumPy has no cryptographic bit generator (PCG64 and
Philox are fast, not unpredictable once outputs are seen): uniform variates
come from the ChaCha20 keystream (`cryptography`), 53 bits each, and the
Box-Muller transform turns pairs of them into standard normal pairs.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Normal values drawn per keystream call: 8 MiB of keystream at most in memory at once.
CHUNK = 1 << 20


class GaussianNoise:
    """A stream of N(0, std^2) draws from a ChaCha20 keystream keyed by os.urandom(32)."""

    def __init__(self) -> None:
        key, nonce = os.urandom(32), os.urandom(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _uniform_pairs(self, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        """(u1 in (0, 1], u2 in [0, 1)), `pairs` of each, 53 random bits per value."""
        raw = np.frombuffer(self._stream.update(bytes(16 * pairs)), dtype="<u8") >> np.uint64(11)
        values = raw.astype(np.float64) * 2.0**-53
        return 1.0 - values[:pairs], values[pairs:]

    def standard(self, size: int) -> np.ndarray:
        """`size` independent standard normal values (float64)."""
        out = np.empty(size, dtype=np.float64)
        for start in range(0, size, 2 * CHUNK):
            part = out[start : start + 2 * CHUNK]
            pairs = (part.size + 1) // 2
            u1, u2 = self._uniform_pairs(pairs)
            radius = np.sqrt(-2.0 * np.log(u1))
            angle = 2.0 * np.pi * u2
            both = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
            part[:] = both[: part.size]
        return out

    def add_to(self, values: np.ndarray, std: float) -> np.ndarray:
        """`values` plus independent N(0, std^2) noise, in their own dtype (a new array)."""
        noise = self.standard(values.size).reshape(values.shape)
        return (values.astype(np.float64) + std * noise).astype(values.dtype)
