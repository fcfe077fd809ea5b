"""The records of the SecAgg+ stages' replies, parsed and checked where they arrive.

A hospital's advertised keys, its sealed shares, the shares it returns to
unmask and its masked upload each have a shape the protocol fixes
(shared_models/protocol.py). A reply that departs from it raises
MalformedReply naming the problem: the workflow drops that hospital, never
the round.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from medfed.shared_models.arrays import readable
from medfed.shared_models.protocol import Key, Record
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import InvalidPublicKey, check_public_key


class MalformedReply(ValueError):
    """A reply that cannot be used as it is: its hospital is dropped, never the run."""


def public_keys(record: ConfigRecord | None, prefix: str = "") -> tuple[bytes, bytes]:
    """The two public keys (c-pk, s-pk) under `prefix` in a SecAgg+ record, each checked
    where it arrives: canonical, of large order (MalformedReply names the problem)."""
    if record is None:
        raise MalformedReply(f"no '{Record.SECAGG}' record")
    try:
        return (
            check_public_key(record.get(prefix + Key.C_PK)),
            check_public_key(record.get(prefix + Key.S_PK)),
        )
    except InvalidPublicKey as err:
        raise MalformedReply(str(err)) from None


def advertised_keys(reply: Message, run_config: bytes) -> tuple[bytes, bytes]:
    """A SecAgg+ advertise reply's two public keys, checked, from a hospital holding the
    run config whose digest is `run_config` (the coordinator's own)."""
    record = reply.content.config_records.get(Record.SECAGG)
    keys = public_keys(record)
    held = record.get(Key.RUN_CONFIG)
    if held != run_config:
        shown = held.hex()[:16] if isinstance(held, bytes) else repr(held)[:20]
        raise MalformedReply(
            f"it holds another run config (digest {shown}…, the coordinator's "
            f"{run_config.hex()[:16]}…)"
        )
    return keys


def sealed_shares(
    record: ConfigRecord | None, dealer: str, neighbours: Iterable[str]
) -> ConfigRecord:
    """A SecAgg+ share reply's record: a ciphertext for each neighbour, the dealer's
    commitment to every share it dealt (its neighbours' and its own), a seed hash."""
    if record is None:
        raise MalformedReply(f"no '{Record.SECAGG}' record")
    neighbours = list(neighbours)
    missing = [n for n in neighbours if not isinstance(record.get(Key.TO_PREFIX + n), bytes)]
    if missing:
        raise MalformedReply(f"no share for neighbour(s) {missing[:3]}")
    for prefix in (Key.SEED_COMMIT_PREFIX, Key.KEY_COMMIT_PREFIX):
        if not all(_digest(record.get(prefix + n)) for n in [*neighbours, dealer]):
            raise MalformedReply("a share commitment is missing or not 32 bytes")
    if not _digest(record.get(Key.SEED_HASH)):
        raise MalformedReply("no 32-byte seed hash")
    return record


def _digest(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def returned_shares(reply: Message, allowed: set[str]) -> dict[str, bytes]:
    """A SecAgg+ unmask reply's shares: only `allowed` keys, each a share's size in bytes."""
    record = reply.content.config_records.get(Record.SECAGG)
    if record is None:
        raise MalformedReply(f"no '{Record.SECAGG}' record")
    shares = dict(record)
    unexpected = sorted(set(shares) - allowed)
    if unexpected:
        raise MalformedReply(f"shares it was not asked for: {unexpected[:3]}")
    if not all(isinstance(v, bytes) and len(v) == shamir.SHARE_BYTES for v in shares.values()):
        raise MalformedReply(f"a share is not {shamir.SHARE_BYTES} bytes")
    return shares


def masked_upload_problems(arrays: ArrayRecord | None, size: int) -> list[str]:
    """Why a secure round's upload cannot be added to the masked sum (empty if it can)."""
    if arrays is None or list(arrays) != [Key.MASKED_ARRAY]:
        return [f"expected one '{Key.MASKED_ARRAY}' array"]
    masked = readable(arrays[Key.MASKED_ARRAY])
    if masked is None:
        return ["the masked update is not a readable array"]
    if masked.dtype != np.uint32 or masked.shape != (size,):
        return [f"masked update is {masked.dtype}{masked.shape}, expected uint32({size},)"]
    return []
