"""The coordinator's SecAgg+ arithmetic: the neighbour graph, and unmasking the sum.

The coordinator only ever holds public keys, ciphertexts it cannot open, the
masked updates (uniform noise one by one) and, after uploads close, seed shares
of the hospitals that uploaded and key shares of those that dropped. From
those it can compute the weighted sum and nothing finer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medfed.shared_models.protocol import Key, minimum_threshold, pairwise_sign
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import MaskStream, Scratch, derive
from medfed.shared_models.secagg.quantize import check_ranges, decode
from medfed.shared_models.secagg.vector import split


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


def fractions(weights: Mapping[str, float]) -> dict[str, float]:
    """Each hospital's share of the aggregation weight; weights must be positive and finite."""
    for node, weight in weights.items():
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"node {node} advertised aggregation weight {weight!r}")
    total = float(sum(weights.values()))
    return {node: float(weight) / total for node, weight in weights.items()}


class MaskedSum:
    """Adds one round's masked uploads as they arrive, then removes the masks."""

    def __init__(
        self,
        template: Mapping[str, tuple[int, ...]],
        clipping_range: float,
        bits: int,
        plan: RoundPlan,
    ) -> None:
        check_ranges(clipping_range, bits, len(plan.participants))
        self.template = dict(template)
        self.clipping_range, self.bits, self.plan = clipping_range, bits, plan
        self.size = sum(int(np.prod(shape)) for shape in self.template.values())
        self.total = np.zeros(self.size, dtype=np.uint32)
        self.added: list[str] = []

    def add(self, node: str, masked: np.ndarray) -> None:
        """Add one hospital's masked upload (uint32 arithmetic wraps, as the masks need)."""
        self.total += masked
        self.added.append(node)

    def unmask(
        self,
        mask_keys: Mapping[str, bytes],
        responses: Mapping[str, Mapping[str, bytes]],
        *,
        dropped: list[str],
        fraction_sum: float,
        purpose: bytes,
    ) -> dict[str, np.ndarray]:
        """The weighted mean update of the hospitals in `self.added`.

        `mask_keys` are the hospitals' public mask keys; `dropped` are
        hospitals that shared keys but sent no upload: their pairwise masks stay
        in the survivors' uploads until removed here, with a mask key rebuilt
        from its shares. `purpose` is the round's `mask_purpose`.
        """
        streams: list[tuple[MaskStream, bool]] = []
        for node in self.added:
            seed = self._rebuild(node, Key.SEED_SHARE_PREFIX, responses)
            streams.append((MaskStream(seed), False))
        for node in dropped:
            secret = self._rebuild(node, Key.KEY_SHARE_PREFIX, responses)
            for other in self.plan.neighbours[node]:
                if other in self.added:
                    seed = derive(secret, mask_keys[other], purpose)
                    # `other` added the pair's mask when its sign is positive: undo that.
                    streams.append((MaskStream(seed), not pairwise_sign(other, node)))
        scratch = Scratch()
        for stream, add in streams:
            stream.apply(self.total, add, scratch)
        mean = decode(self.total, fraction_sum, self.clipping_range, self.bits)
        return split(mean, self.template)

    def _rebuild(
        self, node: str, prefix: str, responses: Mapping[str, Mapping[str, bytes]]
    ) -> bytes:
        plan = self.plan
        shares = {
            plan.xs[holder]: reply[prefix + node]
            for holder, reply in responses.items()
            if holder in plan.group(node) and prefix + node in reply
        }
        if len(shares) < plan.threshold:
            what = "self-mask seed" if prefix == Key.SEED_SHARE_PREFIX else "mask key"
            raise SecAggAbort(
                f"only {len(shares)} shares of node {node}'s {what} came back; "
                f"{plan.threshold} are needed (config key 'secagg-threshold')"
            )
        return shamir.combine(shares, plan.threshold)
