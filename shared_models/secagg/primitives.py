"""Key agreement, key derivation, share encryption and mask expansion.

All primitives are `cryptography`'s: X25519 for agreement, HKDF-SHA256 for
derivation, AES-256-GCM for share encryption and the ChaCha20 keystream as
the pseudo-random generator that expands a 256-bit seed into a mask.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
KEY_BYTES = 32  # raw X25519 keys, private and public
CURVE_PRIME = 2**255 - 19
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def new_private_key() -> bytes:
    """A fresh X25519 private key, as its raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


class InvalidPublicKey(ValueError):
    """Bytes that are not a canonical X25519 public key of large order."""


def check_public_key(key: object) -> bytes:
    """`key` when it is a canonical X25519 public key of large order; InvalidPublicKey else.

    X25519 ignores bit 255 and reduces u modulo p = 2**255 - 19, so two byte
    strings can name one key: only the canonical encoding is accepted (keys
    are then compared as bytes). A point of small order (0, 1, p - 1, ...)
    makes every shared secret zero: any neighbour's derivation with it fails,
    so it is refused where it arrives, naming its sender, instead of failing
    its honest neighbours. `cryptography` refuses an all-zero shared secret;
    an exchange with a throwaway key finds every such point.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise InvalidPublicKey(f"a public key is {KEY_BYTES} bytes")
    if key[-1] & 0x80 or int.from_bytes(key, "little") >= CURVE_PRIME:
        raise InvalidPublicKey("a public key is not in canonical form")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError as err:
        raise InvalidPublicKey("a public key is a point of small order") from err
    return key


def derive(private: bytes, peer_public: bytes, label: bytes) -> bytes:
    """A 256-bit key both ends of the pair derive alike, separated by `label` (which names
    the purpose, the round and the pair: protocol.pair_label)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(hashes.SHA256(), SEED_BYTES, salt=None, info=b"medfed-secagg/" + label).derive(
        shared
    )


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """AES-GCM with a random nonce; `context` (sender, receiver, round) is authenticated."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def open_sealed(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """Decrypt `seal`'s output; raises InvalidTag when key, data or context differ."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], context)


class Scratch:
    """Reusable buffers for keystream output, one chunk long.

    Writing into memory that is already mapped is about five times faster
    than letting every call allocate its own, and a chunk that stays in the
    CPU cache (1 MiB) beats a model-sized buffer: no page faults, and no
    memory held beyond 2 MiB however large the model.
    """

    CHUNK_VALUES = 1 << 18  # uint32 mask values per keystream call (1 MiB)

    def __init__(self) -> None:
        self.zeros = memoryview(bytes(4 * self.CHUNK_VALUES))
        self.out = bytearray(4 * self.CHUNK_VALUES + 32)  # update_into wants room beyond


class MaskStream:
    """Successive uint32 mask values from one seed (the ChaCha20 keystream).

    Reading the stream array by array, in the model's key order, gives both
    ends the same mask without ever holding the whole model-sized mask.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes")
        # A fresh seed per round and pair, so a fixed nonce never repeats a keystream.
        cipher = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None)
        self._encryptor = cipher.encryptor()

    def apply(self, target: np.ndarray, add: bool, scratch: Scratch) -> None:
        """Add (or subtract) the next `target.size` mask values to the flat uint32 `target`,
        one chunk of the keystream at a time (the stream continues across chunks)."""
        for start in range(0, target.size, scratch.CHUNK_VALUES):
            part = target[start : start + scratch.CHUNK_VALUES]
            self._encryptor.update_into(scratch.zeros[: 4 * part.size], scratch.out)
            mask = np.frombuffer(scratch.out, dtype="<u4", count=part.size)
            if add:
                part += mask
            else:
                part -= mask
