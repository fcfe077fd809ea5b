"""The coordinator's SecAgg+ arithmetic: the neighbour graph, and unmasking the sum.

The coordinator only ever holds public keys, ciphertexts it cannot open, the
masked updates (uniform noise one by one) and, after uploads close, seed shares
of the hospitals that uploaded and key shares of those that dropped. From
those it can compute the weighted sum and nothing finer.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from medfed.shared_models.protocol import (
    SECAGG_MAX_PARTICIPANTS,
    SECAGG_MIN_PARTICIPANTS,
    Key,
    minimum_threshold,
    pairwise_sign,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import MaskStream, Scratch, derive, public_key
from medfed.shared_models.secagg.quantize import Encoding, check_ranges, decode
from medfed.shared_models.secagg.vector import split

# Subsets of shares tried when a rebuilt secret fails its check (wrong shares).
MAX_SUBSETS = 200


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
    """Adds one round's masked uploads as they arrive, then removes the masks."""

    def __init__(
        self, template: Mapping[str, tuple[int, ...]], encoding: Encoding, plan: RoundPlan
    ) -> None:
        check_ranges(encoding.clipping_range, encoding.bits, len(plan.participants))
        self.template = dict(template)
        self.encoding, self.plan = encoding, plan
        # the update values, then the hospital's own weight
        self.size = sum(int(np.prod(shape)) for shape in self.template.values()) + 1
        self.total = np.zeros(self.size, dtype=np.uint32)
        self.added: list[str] = []

    def add(self, node: str, masked: np.ndarray) -> None:
        """Add one hospital's masked upload (uint32 arithmetic wraps, as the masks need)."""
        self.total += masked
        self.added.append(node)

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
        mask key rebuilt from its shares. Every rebuilt secret is checked
        against what its owner committed to, so a wrong share is never used.
        `purpose` is the round's `mask_purpose`.
        """
        streams: list[tuple[MaskStream, bool]] = []
        for node in self.added:
            seed = self._rebuild(node, Key.SEED_SHARE_PREFIX, responses, commitments.seed_ok)
            streams.append((MaskStream(seed), False))
        for node in dropped:
            secret = self._rebuild(node, Key.KEY_SHARE_PREFIX, responses, commitments.key_ok)
            for other in self.plan.neighbours[node]:
                if other in self.added:
                    seed = derive(secret, commitments.keys[other][1], purpose)
                    # `other` added the pair's mask when its sign is positive: undo that.
                    streams.append((MaskStream(seed), not pairwise_sign(other, node)))
        scratch = Scratch()
        for stream, add in streams:
            stream.apply(self.total, add, scratch)
        try:
            mean, ratio_sum = decode(
                self.total, self.encoding, len(self.plan.participants), len(self.added)
            )
        except ValueError as err:
            raise SecAggAbort(str(err)) from err
        return split(mean, self.template), ratio_sum

    def _rebuild(
        self,
        node: str,
        prefix: str,
        responses: Mapping[str, Mapping[str, bytes]],
        verify: Callable[[str, bytes], bool],
    ) -> bytes:
        """A secret of `node` from `threshold` of its holders' shares, checked by `verify`.

        Normally the first `threshold` shares rebuild it; a wrong share makes
        the check fail and other subsets are tried (a bounded number of them).
        """
        plan = self.plan
        shares = {
            plan.xs[holder]: reply[prefix + node]
            for holder, reply in responses.items()
            if holder in plan.group(node) and prefix + node in reply
        }
        what = "self-mask seed" if prefix == Key.SEED_SHARE_PREFIX else "mask key"
        if len(shares) < plan.threshold:
            raise SecAggAbort(
                f"only {len(shares)} shares of node {node}'s {what} came back; "
                f"{plan.threshold} are needed (config key 'secagg-threshold')"
            )
        subsets = itertools.combinations(sorted(shares), plan.threshold)
        for subset in itertools.islice(subsets, MAX_SUBSETS):
            try:
                secret = shamir.combine({x: shares[x] for x in subset}, plan.threshold)
            except ValueError:
                continue
            if verify(node, secret):
                return secret
        raise SecAggAbort(f"the shares of node {node}'s {what} do not rebuild what it committed to")


@dataclass(frozen=True)
class Commitments:
    """What each hospital made public for a round: its public keys and its seed hash."""

    keys: Mapping[str, tuple[bytes, bytes]]  # node -> (c-pk, s-pk)
    seed_hashes: Mapping[str, bytes]

    def seed_ok(self, node: str, seed: bytes) -> bool:
        """Whether `seed` is the self-mask seed `node` committed to."""
        return hashlib.sha256(seed).digest() == self.seed_hashes.get(node)

    def key_ok(self, node: str, secret: bytes) -> bool:
        """Whether `secret` is the mask private key whose public half `node` advertised."""
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
