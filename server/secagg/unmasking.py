"""The coordinator's SecAgg+ arithmetic: the neighbour graph, and unmasking the sum.

The coordinator only ever holds public keys, ciphertexts it cannot open, the
masked updates (uniform noise one by one) and, after uploads close, seed shares
of the hospitals that uploaded and key shares of those that dropped. From
those it can compute the weighted sum and nothing finer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from medfed.shared_models.protocol import (
    SECAGG_MAX_PARTICIPANTS,
    SECAGG_MIN_PARTICIPANTS,
    Key,
    minimum_threshold,
    pair_label,
    pairwise_sign,
    share_commitment,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import MaskStream, Scratch, derive, public_key
from medfed.shared_models.secagg.quantize import (
    EXTRA_SLOTS,
    WEIGHT_SLOT,
    Encoding,
    check_ranges,
    decode,
)
from medfed.shared_models.secagg.vector import split

# What a share prefix in an unmask reply rebuilds: the commitment kind, and its name.
SECRETS = {Key.SEED_SHARE_PREFIX: ("b", "self-mask seed"), Key.KEY_SHARE_PREFIX: ("sk", "mask key")}


class SecAggAbort(RuntimeError):
    """Too many hospitals dropped to finish the round securely; the message says which."""


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part, each one's Shamir x-coordinate and neighbours, and the threshold."""

    participants: tuple[str, ...]
    xs: Mapping[str, int]
    neighbours: Mapping[str, tuple[str, ...]]
    threshold: int

    def group(self, node: str) -> set[str]:
        """The node and its neighbours: who holds shares of its secrets."""
        return {node, *self.neighbours[node]}


def plan_round(nodes: list[str], neighbours: int, threshold: int) -> RoundPlan:
    """A SecAgg+ ring graph of degree `neighbours` (0: everyone, i.e. SecAgg).

    Neighbours sit within `ceil(neighbours / 2)` places on a randomly shuffled
    ring, so no hospital can choose whose masks it shares.
    """
    participants = tuple(sorted(nodes, key=int))
    n = len(participants)
    if n > SECAGG_MAX_PARTICIPANTS:
        raise ValueError(
            f"{n} hospitals: secure aggregation encodes at most {SECAGG_MAX_PARTICIPANTS}"
        )
    if n < SECAGG_MIN_PARTICIPANTS:
        raise ValueError(
            f"{n} hospitals: secure aggregation needs at least {SECAGG_MIN_PARTICIPANTS} "
            "(with fewer, one could learn another's update from the sum)"
        )
    if neighbours < 0:
        raise ValueError(f"config key 'secagg-neighbours' = {neighbours}: expected 0 or more")
    degree = n - 1 if neighbours == 0 else min(n - 1, 2 * ((neighbours + 1) // 2))
    ring = list(participants)
    random.SystemRandom().shuffle(ring)
    half = (degree + 1) // 2
    graph = {}
    for position, node in enumerate(ring):
        around = {ring[(position + step) % n] for step in range(-half, half + 1)} - {node}
        graph[node] = tuple(sorted(around, key=int))
    smallest = min(len(v) for v in graph.values()) + 1
    chosen = threshold or minimum_threshold(smallest)
    if not minimum_threshold(max(len(v) for v in graph.values()) + 1) <= chosen <= smallest:
        raise ValueError(
            f"config key 'secagg-threshold' = {threshold}: with {n} hospitals and "
            f"groups of {smallest} it must be {minimum_threshold(smallest)}..{smallest}"
        )
    xs = {node: index + 1 for index, node in enumerate(participants)}
    return RoundPlan(participants, xs, graph, chosen)


class MaskedSum:
    """Adds one round's masked uploads as they arrive, then removes the masks.

    `bad_shares` names, after `unmask`, every hospital that returned a share
    other than the one its dealer committed to (ignored: the others rebuild).
    """

    def __init__(
        self, template: Mapping[str, tuple[int, ...]], encoding: Encoding, plan: RoundPlan
    ) -> None:
        check_ranges(encoding.clipping_range, encoding.bits, len(plan.participants))
        self.template = dict(template)
        self.encoding, self.plan = encoding, plan
        # the update values, then the hospital's own weight and its count of clipped values
        self.size = sum(int(np.prod(shape)) for shape in self.template.values()) + EXTRA_SLOTS
        self.total = np.zeros(self.size, dtype=np.uint32)
        self.added: list[str] = []
        self.weight_units = 0  # what the uploads' weights must sum to, from the clear weights
        self.bad_shares: dict[str, str] = {}
        self.clipped = 0  # values the hospitals clipped, in total (after `unmask`)

    def add(self, node: str, masked: np.ndarray, weight_units: int) -> None:
        """Add one hospital's masked upload (uint32 arithmetic wraps, as the masks need);
        `weight_units` is the fixed-point weight its clear weight says it encoded."""
        self.total += masked
        self.added.append(node)
        self.weight_units += weight_units

    def unmask(
        self,
        commitments: Commitments,
        responses: Mapping[str, Mapping[str, bytes]],
        *,
        dropped: list[str],
        purpose: bytes,
    ) -> tuple[dict[str, np.ndarray], float]:
        """The weighted mean update of the hospitals in `self.added`, and their weight sum.

        `dropped` are hospitals that shared keys but sent no upload: their
        pairwise masks stay in the survivors' uploads until removed here, with a
        mask key rebuilt from its shares. Every share is checked against its
        dealer's commitment and every rebuilt secret against what its owner
        committed to, so a wrong share is never used. `purpose` is the round's
        `mask_purpose`.
        """
        streams: list[tuple[MaskStream, bool]] = []
        for node in self.added:
            seed = self._rebuild(node, Key.SEED_SHARE_PREFIX, responses, commitments)
            streams.append((MaskStream(seed), False))
        for node in dropped:
            secret = self._rebuild(node, Key.KEY_SHARE_PREFIX, responses, commitments)
            own = commitments.keys[node][1]
            for other in self.plan.neighbours[node]:
                if other in self.added:
                    theirs = commitments.keys[other][1]
                    label = pair_label(purpose, ((node, own), (other, theirs)))
                    # `other` added the pair's mask when its sign is positive: undo that.
                    streams.append(
                        (MaskStream(derive(secret, theirs, label)), not pairwise_sign(other, node))
                    )
        scratch = Scratch()
        for stream, add in streams:
            stream.apply(self.total, add, scratch)
        self._check_weights()
        try:
            mean, ratio_sum, self.clipped = decode(
                self.total, self.encoding, len(self.plan.participants), len(self.added)
            )
        except ValueError as err:
            raise SecAggAbort(str(err)) from err
        return split(mean, self.template), ratio_sum

    def _check_weights(self) -> None:
        """The unmasked weights must sum to exactly what the hospitals' clear weights say.

        Each hospital's weight is checked on its own only by that hospital; a
        hospital that wrote its weight slot could shrink the sum (scaling the
        honest mean up by as much as the maximum weight) while every sum-level
        bound still held. The clear weights pin the sum down.
        """
        units = int(self.total.view(np.int32)[WEIGHT_SLOT])
        if units != self.weight_units:
            raise SecAggAbort(
                f"the unmasked weights sum to {units} units, but the hospitals' clear weights "
                f"say {self.weight_units}: an upload's weight is not the one its hospital "
                "reported (or the masks did not cancel)"
            )

    def _rebuild(
        self,
        node: str,
        prefix: str,
        responses: Mapping[str, Mapping[str, bytes]],
        commitments: Commitments,
    ) -> bytes:
        """A secret of `node` from `threshold` of its holders' shares, each checked against
        the commitment `node` gave for it, the secret checked against `node`'s own
        commitment (seed hash, public key): a holder returning another share is named
        and skipped; a dealer whose checked shares rebuild something else is named."""
        plan = self.plan
        kind, what = SECRETS[prefix]
        shares: dict[int, bytes] = {}
        for holder, reply in sorted(responses.items(), key=lambda item: int(item[0])):
            if holder not in plan.group(node) or prefix + node not in reply:
                continue
            if commitments.share_ok((node, holder), kind, reply[prefix + node]):
                shares[plan.xs[holder]] = reply[prefix + node]
            else:
                self.bad_shares[holder] = (
                    f"returned a share of node {node}'s {what} that is not the one dealt (ignored)"
                )
        if len(shares) < plan.threshold:
            raise SecAggAbort(
                f"only {len(shares)} checked shares of node {node}'s {what} came back; "
                f"{plan.threshold} are needed (config key 'secagg-threshold')"
            )
        try:
            secret = shamir.combine(shares, plan.threshold)
        except ValueError:
            secret = b""
        if not commitments.secret_ok(node, kind, secret):
            raise SecAggAbort(
                f"node {node} dealt shares of its {what} that match its commitments but do "
                "not rebuild the secret it committed to"
            )
        return secret


@dataclass(frozen=True)
class Commitments:
    """What each hospital made public for a round: its public keys, its seed hash and the
    commitment to every share it dealt (its share record: "hb.<holder>", "hsk.<holder>")."""

    run: int
    server_round: int
    keys: Mapping[str, tuple[bytes, bytes]]  # node -> (c-pk, s-pk)
    seed_hashes: Mapping[str, bytes]
    dealt: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def share_ok(self, route: tuple[str, str], kind: str, share: bytes) -> bool:
        """Whether `share` is the one the dealer (route[0]) committed to giving route[1]."""
        dealer, holder = route
        prefix = Key.SEED_COMMIT_PREFIX if kind == "b" else Key.KEY_COMMIT_PREFIX
        committed = self.dealt.get(dealer, {}).get(prefix + holder)
        expected = share_commitment(self.run, self.server_round, route, kind, share)
        return committed == expected

    def secret_ok(self, node: str, kind: str, secret: bytes) -> bool:
        """Whether `secret` is the self-mask seed ("b") or the mask private key ("sk") that
        `node` committed to (its seed hash; the public half it advertised)."""
        if len(secret) != shamir.SECRET_BYTES:
            return False
        if kind == "b":
            return hashlib.sha256(secret).digest() == self.seed_hashes.get(node)
        return public_key(secret) == self.keys[node][1]


def survivors_connected(plan: RoundPlan, survivors: list[str]) -> bool:
    """Whether the survivors' neighbour graph is one piece.

    With SecAgg+ neighbourhoods, dropouts can split it: unmasking would then
    give the sum of each piece, finer than the sum of all.
    """
    alive = set(survivors)
    if not alive:
        return False
    seen, frontier = set(), [next(iter(alive))]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        frontier += [n for n in plan.neighbours[node] if n in alive and n not in seen]
    return seen == alive
