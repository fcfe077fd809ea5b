"""The hospital's SecAgg+ protocol state: keys, shares, the masked update, unmasking.

Everything secret (both private keys, the self-mask seed, the shares other
hospitals sent) lives in the node's own `context.state`; what leaves the site
is public keys, ciphertexts only the addressed neighbour can open, the masked
update and, at the end, exactly one kind of share per neighbour. The checks
here are the hospital's own: a coordinator cannot talk it into a threshold
too low to protect it or into revealing both secrets of one neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from medfed.shared_models.protocol import (
    Config,
    Key,
    mask_purpose,
    minimum_threshold,
    pairwise_sign,
    share_context,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import (
    MaskStream,
    Scratch,
    derive,
    new_private_key,
    open_sealed,
    public_key,
    seal,
)
from medfed.shared_models.secagg.quantize import check_fraction, check_ranges, encode


class SecAggRefused(ValueError):
    """The coordinator asked for something that would weaken this hospital's protection."""


@dataclass(frozen=True)
class ShareRequest:
    """What the coordinator asks one hospital to share for one round."""

    server_round: int
    xs: Mapping[str, int]  # Shamir x-coordinate of each member of this hospital's group
    neighbour_keys: Mapping[str, tuple[bytes, bytes]]  # neighbour -> (c-pk, s-pk)
    threshold: int
    fraction: float  # this hospital's share of the round's aggregation weight
    clipping_range: float
    bits: int
    weight: float  # the aggregation weight the coordinator used for `fraction`

    @classmethod
    def from_records(cls, config: Mapping, secagg: Mapping) -> ShareRequest:
        """Read the request from a message's `config` and `secagg` records."""
        xs = {
            key.removeprefix(Key.X_PREFIX): int(value)
            for key, value in secagg.items()
            if key.startswith(Key.X_PREFIX)
        }
        names = [k.removeprefix(Key.C_PK_PREFIX) for k in secagg if k.startswith(Key.C_PK_PREFIX)]
        neighbours = {
            name: (secagg[Key.C_PK_PREFIX + name], secagg[Key.S_PK_PREFIX + name]) for name in names
        }
        return cls(
            server_round=int(config[Config.SERVER_ROUND]),
            xs=xs,
            neighbour_keys=neighbours,
            threshold=int(config[Key.THRESHOLD]),
            fraction=float(config[Key.FRACTION]),
            clipping_range=float(config[Key.CLIPPING_RANGE]),
            bits=int(config[Key.QUANTIZATION_BITS]),
            weight=float(config[Key.WEIGHT]),
        )


class HospitalSecAgg:
    """One hospital's protocol state for one round, kept in a ConfigRecord."""

    def __init__(self, state: ConfigRecord) -> None:
        self.state = state

    @classmethod
    def start(
        cls, run: int, server_round: int, node: str
    ) -> tuple[HospitalSecAgg, dict[str, bytes]]:
        """Fresh key pairs for this round; returns the state and its public keys."""
        state = ConfigRecord(
            {
                "run": run,
                "round": server_round,
                "node": node,
                "c-sk": new_private_key(),
                "s-sk": new_private_key(),
            }
        )
        public = {Key.C_PK: public_key(state["c-sk"]), Key.S_PK: public_key(state["s-sk"])}
        return cls(state), public

    @property
    def weight(self) -> float:
        """The aggregation weight the coordinator weighs this hospital by this round."""
        return float(self.state["weight"])

    def _check_round(self, server_round: int) -> None:
        if int(self.state["round"]) != server_round:
            raise SecAggRefused(
                f"secure-aggregation state is for round {self.state['round']}, "
                f"not round {server_round}"
            )

    def _check_request(self, request: ShareRequest) -> None:
        """Refuse a group, threshold or key set that would weaken this hospital's protection."""
        me = str(self.state["node"])
        keys = request.neighbour_keys
        if me in keys or not set(keys) <= set(request.xs) or me not in request.xs:
            raise SecAggRefused("neighbour list does not match the round's participants")
        group = len(keys) + 1
        if not minimum_threshold(group) <= request.threshold <= group:
            raise SecAggRefused(
                f"threshold {request.threshold} for a group of {group} is unsafe "
                f"(needs {minimum_threshold(group)}..{group})"
            )
        own = (public_key(self.state["c-sk"]), public_key(self.state["s-sk"]))
        every_key = [k for pair in keys.values() for k in pair] + list(own)
        if len(set(every_key)) != len(every_key):
            raise SecAggRefused("public keys repeat across neighbours")
        check_fraction(request.fraction)
        check_ranges(request.clipping_range, request.bits, len(request.xs))

    def share_keys(self, request: ShareRequest) -> dict[str, bytes]:
        """Shamir-share the self-mask seed and mask key; one ciphertext per neighbour."""
        self._check_round(request.server_round)
        self._check_request(request)
        me = str(self.state["node"])
        neighbours = sorted(request.neighbour_keys)
        seed = os.urandom(shamir.SECRET_BYTES)
        coords = [int(request.xs[h]) for h in [*neighbours, me]]
        seed_shares = shamir.split(seed, coords, request.threshold)
        key_shares = shamir.split(self.state["s-sk"], coords, request.threshold)
        sealed = {}
        for holder in neighbours:
            x = int(request.xs[holder])
            key = derive(self.state["c-sk"], request.neighbour_keys[holder][0], b"share")
            context = share_context(int(self.state["run"]), request.server_round, me, holder)
            sealed[holder] = seal(key, seed_shares[x] + key_shares[x], context)
        x_me = int(request.xs[me])
        self.state.update(
            {
                "seed": seed,
                "threshold": request.threshold,
                "fraction": request.fraction,
                "clipping-range": request.clipping_range,
                "bits": request.bits,
                "weight": request.weight,
                "neighbours": neighbours,
                f"share-b.{me}": seed_shares[x_me],
                f"share-sk.{me}": key_shares[x_me],
            }
        )
        for holder in neighbours:
            self.state[f"c-pk.{holder}"] = request.neighbour_keys[holder][0]
            self.state[f"s-pk.{holder}"] = request.neighbour_keys[holder][1]
        return sealed

    def receive_shares(self, server_round: int, sealed: Mapping[str, bytes]) -> None:
        """Open the neighbours' ciphertexts; a tampered or misrouted one names the sender."""
        self._check_round(server_round)
        me = str(self.state["node"])
        unknown = sorted(set(sealed) - set(self.state["neighbours"]))
        if unknown:
            raise SecAggRefused(f"shares from non-neighbours {unknown}")
        for sender, ciphertext in sealed.items():
            key = derive(self.state["c-sk"], self.state[f"c-pk.{sender}"], b"share")
            context = share_context(int(self.state["run"]), server_round, sender, me)
            try:
                plain = open_sealed(key, ciphertext, context)
            except Exception as err:  # InvalidTag carries no message
                raise SecAggRefused(
                    f"the share ciphertext from node {sender} failed authentication"
                ) from err
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggRefused(f"the share from node {sender} has the wrong length")
            self.state[f"share-b.{sender}"] = plain[: shamir.SHARE_BYTES]
            self.state[f"share-sk.{sender}"] = plain[shamir.SHARE_BYTES :]
        self.state["senders"] = sorted(sealed)

    def mask(self, server_round: int, update: np.ndarray) -> tuple[np.ndarray, int]:
        """The masked encoding of the flat float update, and how many values were clipped.

        Pairwise masks are added for exactly the neighbours whose shares
        arrived: those are the ones the coordinator can account for.
        """
        self._check_round(server_round)
        me = str(self.state["node"])
        run = int(self.state["run"])
        masked, clipped = encode(
            update,
            float(self.state["fraction"]),
            float(self.state["clipping-range"]),
            int(self.state["bits"]),
        )
        scratch = Scratch()
        MaskStream(self.state["seed"]).apply(masked, True, scratch)
        for other in self.state.get("senders", []):
            seed = derive(
                self.state["s-sk"], self.state[f"s-pk.{other}"], mask_purpose(run, server_round)
            )
            MaskStream(seed).apply(masked, pairwise_sign(me, other), scratch)
        self.state["masked"] = True
        return masked, clipped

    def unmask(
        self, server_round: int, survivors: list[str], dropped: list[str]
    ) -> dict[str, bytes]:
        """Seed shares of surviving neighbours, key shares of dropped ones; never both.

        The state is deleted by the caller right after: asking again gets nothing.
        """
        self._check_round(server_round)
        me = str(self.state["node"])
        if not self.state.get("masked"):
            raise SecAggRefused("this hospital sent no masked update this round")
        if set(survivors) & set(dropped):
            raise SecAggRefused("a node is listed both as survivor and as dropped")
        group = set(self.state["neighbours"]) | {me}
        held = set(self.state.get("senders", [])) | {me}
        if me not in survivors:
            raise SecAggRefused("this hospital is not listed among the survivors")
        alive = [n for n in survivors if n in group]
        if len(alive) < int(self.state["threshold"]):
            raise SecAggRefused(
                f"only {len(alive)} of this hospital's group survived; "
                f"threshold is {self.state['threshold']}"
            )
        shares = {}
        for node in survivors:
            if node in held:
                shares[Key.SEED_SHARE_PREFIX + node] = self.state[f"share-b.{node}"]
        for node in dropped:
            if node in held and node != me:
                shares[Key.KEY_SHARE_PREFIX + node] = self.state[f"share-sk.{node}"]
        return shares
