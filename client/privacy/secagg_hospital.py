"""The hospital's SecAgg+ protocol state: keys, shares, the masked update, unmasking.

Everything secret (both private keys, the self-mask seed, the shares other
hospitals sent) lives in the node's own `context.state`; what leaves the site
is public keys, ciphertexts only the addressed neighbour can open, the masked
update and, at the end, exactly one kind of share per neighbour. The checks
here are the hospital's own: a coordinator cannot talk it into a threshold
too low to protect it or into revealing both secrets of one neighbour.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from medfed.shared_models.protocol import (
    SECAGG_MAX_PARTICIPANTS,
    SECAGG_MIN_PARTICIPANTS,
    Config,
    Key,
    consistency_purpose,
    mask_purpose,
    minimum_threshold,
    pair_label,
    pairwise_sign,
    share_commitment,
    share_context,
    share_purpose,
    share_terms,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import (
    InvalidPublicKey,
    MaskStream,
    Scratch,
    check_public_key,
    derive,
    new_private_key,
    open_sealed,
    public_key,
    seal,
)
from medfed.shared_models.secagg.quantize import Encoding, check_ranges, encode, weight_ratio


class SecAggRefused(ValueError):
    """The coordinator asked for something that would weaken this hospital's protection."""


class UpdateRefused(ValueError):
    """This hospital's update cannot be sent (the text says why, without site data)."""


# Shamir x-coordinates are small positive integers: never 0 (nor a multiple of the
# prime), where a share would be the secret itself.
MAX_COORDINATE = 2**31 - 1


def _coordinate(value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_COORDINATE:
        raise ValueError(f"x-coordinate {value!r}: expected an integer in 1..{MAX_COORDINATE}")
    return value


@dataclass(frozen=True)
class RunTerms:
    """What a hospital takes from its own run config into every round it shares keys for."""

    encoding: Encoding
    run_config: bytes  # round_terms.run_config_digest of the run's config
    whole_group: bool  # secagg-neighbours = 0: every participant is this hospital's neighbour


@dataclass(frozen=True)
class ShareRequest:
    """What the coordinator asks one hospital to share for one round."""

    server_round: int
    xs: Mapping[str, int]  # Shamir x-coordinate of each member of this hospital's group
    neighbour_keys: Mapping[str, tuple[bytes, bytes]]  # neighbour -> (c-pk, s-pk)
    threshold: int
    participants: int  # hospitals in the round

    @classmethod
    def from_records(cls, config: Mapping, secagg: Mapping) -> ShareRequest:
        """Read the request from a message's `config` and `secagg` records.

        Anything of the wrong type is refused here, before a secret is touched.
        """
        try:
            xs = {
                key.removeprefix(Key.X_PREFIX): _coordinate(value)
                for key, value in secagg.items()
                if key.startswith(Key.X_PREFIX)
            }
            names = [
                k.removeprefix(Key.C_PK_PREFIX) for k in secagg if k.startswith(Key.C_PK_PREFIX)
            ]
            neighbours = {
                name: (secagg[Key.C_PK_PREFIX + name], secagg[Key.S_PK_PREFIX + name])
                for name in names
            }
            request = cls(
                server_round=int(config[Config.SERVER_ROUND]),
                xs=xs,
                neighbour_keys=neighbours,
                threshold=int(config[Key.THRESHOLD]),
                participants=int(config[Key.PARTICIPANTS]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggRefused(f"malformed share request: {err!r}") from err
        for name, pair in neighbours.items():
            try:
                for key in pair:
                    check_public_key(key)
            except InvalidPublicKey as err:
                raise SecAggRefused(f"node {name}'s public key is refused: {err}") from None
        return request


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
    def seed_hash(self) -> bytes:
        """The commitment to this round's self-mask seed (after `share_keys`)."""
        return bytes(self.state["seed-hash"])

    def _encoding(self) -> Encoding:
        """The encoding this hospital agreed to when it shared its keys."""
        return Encoding(
            clipping_range=float(self.state["clipping-range"]),
            bits=int(self.state["bits"]),
            max_weight=float(self.state["max-weight"]),
            equal_weights=bool(self.state["equal-weights"]),
        )

    def _check_round(self, server_round: int) -> None:
        if int(self.state["round"]) != server_round:
            raise SecAggRefused(
                f"secure-aggregation state is for round {self.state['round']}, "
                f"not round {server_round}"
            )

    def _check_request(self, request: ShareRequest, terms: RunTerms) -> None:
        """Refuse a group, threshold or key set that would weaken this hospital's protection."""
        me = str(self.state["node"])
        keys = request.neighbour_keys
        if me in keys or not set(keys) <= set(request.xs) or me not in request.xs:
            raise SecAggRefused("neighbour list does not match the round's participants")
        if terms.whole_group and request.participants != len(keys) + 1:
            raise SecAggRefused(
                f"a round of {request.participants} hospitals, but {len(keys) + 1} in this "
                "hospital's group, where the run puts everyone in one group (secagg-neighbours 0)"
            )
        if request.participants > SECAGG_MAX_PARTICIPANTS:
            raise SecAggRefused(
                f"a round of {request.participants} hospitals: at most "
                f"{SECAGG_MAX_PARTICIPANTS} can be encoded"
            )
        if request.participants < SECAGG_MIN_PARTICIPANTS or len(keys) < 2:
            raise SecAggRefused(
                f"a round of {request.participants} hospitals with {len(keys)} neighbours: "
                f"at least {SECAGG_MIN_PARTICIPANTS} hospitals and 2 neighbours are needed, "
                "or one could learn another's update from the sum"
            )
        group = len(keys) + 1
        if not minimum_threshold(group) <= request.threshold <= group:
            raise SecAggRefused(
                f"threshold {request.threshold} for a group of {group} is unsafe "
                f"(needs {minimum_threshold(group)}..{group})"
            )
        group_xs = [request.xs[h] for h in [*keys, me]]
        if len(set(group_xs)) != len(group_xs):
            raise SecAggRefused("two members of the group share an x-coordinate")
        own = (public_key(self.state["c-sk"]), public_key(self.state["s-sk"]))
        every_key = [k for pair in keys.values() for k in pair] + list(own)
        if len(set(every_key)) != len(every_key):
            raise SecAggRefused("public keys repeat across neighbours")
        check_ranges(terms.encoding.clipping_range, terms.encoding.bits, request.participants)

    def _share_key(self, other: str, other_public: bytes) -> bytes:
        """The key that encrypts shares between this hospital and `other` this round."""
        me, purpose = (
            str(self.state["node"]),
            share_purpose(int(self.state["run"]), int(self.state["round"])),
        )
        own = public_key(self.state["c-sk"])
        return derive(
            self.state["c-sk"],
            other_public,
            pair_label(purpose, ((me, own), (other, other_public))),
        )

    def _terms_text(self) -> str:
        """The round's terms that every share ciphertext of this round binds."""
        participants, threshold = int(self.state["participants"]), int(self.state["threshold"])
        return share_terms(
            self._encoding().terms(participants, threshold), bytes(self.state["run-config"])
        )

    def share_keys(self, request: ShareRequest, terms: RunTerms) -> dict[str, bytes]:
        """Shamir-share the self-mask seed and mask key: one ciphertext per neighbour
        ("to.<node>") and the commitment to every share dealt ("hb.<node>", "hsk.<node>",
        this hospital's own included).

        The state's `seed-hash` goes to the coordinator with them: it lets the
        coordinator check a rebuilt seed, and says nothing of the seed itself.
        """
        self._check_round(request.server_round)
        self._check_request(request, terms)
        me, run = str(self.state["node"]), int(self.state["run"])
        neighbours = sorted(request.neighbour_keys)
        seed = os.urandom(shamir.SECRET_BYTES)
        coords = [int(request.xs[h]) for h in [*neighbours, me]]
        dealt = {
            "b": shamir.split(seed, coords, request.threshold),
            "sk": shamir.split(self.state["s-sk"], coords, request.threshold),
        }
        encoding = terms.encoding
        self.state.update(
            {
                "seed": seed,
                "seed-hash": hashlib.sha256(seed).digest(),
                "threshold": request.threshold,
                "participants": request.participants,
                "clipping-range": encoding.clipping_range,
                "bits": encoding.bits,
                "max-weight": encoding.max_weight,
                "equal-weights": encoding.equal_weights,
                "run-config": terms.run_config,
                "neighbours": neighbours,
                f"share-b.{me}": dealt["b"][int(request.xs[me])],
                f"share-sk.{me}": dealt["sk"][int(request.xs[me])],
            }
        )
        out = {}
        for holder in [*neighbours, me]:
            x = int(request.xs[holder])
            for kind, prefix in (("b", Key.SEED_COMMIT_PREFIX), ("sk", Key.KEY_COMMIT_PREFIX)):
                route = (me, holder)
                commitment = share_commitment(
                    run, request.server_round, route, kind, dealt[kind][x]
                )
                out[prefix + holder] = commitment
            if holder == me:
                continue
            context = share_context(run, request.server_round, (me, holder), self._terms_text())
            key = self._share_key(holder, request.neighbour_keys[holder][0])
            out[Key.TO_PREFIX + holder] = seal(key, dealt["b"][x] + dealt["sk"][x], context)
            self.state[f"c-pk.{holder}"] = request.neighbour_keys[holder][0]
            self.state[f"s-pk.{holder}"] = request.neighbour_keys[holder][1]
        return out

    def receive_shares(self, server_round: int, inbox: Mapping[str, bytes]) -> None:
        """Open the neighbours' ciphertexts ("from.<node>") and check each share against the
        commitment its dealer gave the coordinator ("hb.<node>", "hsk.<node>"): a tampered,
        misrouted or uncommitted share names its sender, and this hospital does not mask."""
        self._check_round(server_round)
        if "neighbours" not in self.state:
            raise SecAggRefused("no shares were made this round: the share step comes first")
        me, run = str(self.state["node"]), int(self.state["run"])
        sealed = {
            k.removeprefix(Key.FROM_PREFIX): v
            for k, v in inbox.items()
            if k.startswith(Key.FROM_PREFIX)
        }
        unknown = sorted(set(sealed) - set(self.state["neighbours"]))
        if unknown:
            raise SecAggRefused(f"shares from non-neighbours {unknown}")
        for sender, ciphertext in sealed.items():
            key = self._share_key(sender, bytes(self.state[f"c-pk.{sender}"]))
            context = share_context(run, server_round, (sender, me), self._terms_text())
            try:
                plain = open_sealed(key, ciphertext, context)
            except Exception as err:  # InvalidTag carries no message
                raise SecAggRefused(
                    f"the share ciphertext from node {sender} failed authentication (tampered, "
                    "misrouted, or sealed under other round terms)"
                ) from err
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggRefused(f"the share from node {sender} has the wrong length")
            halves = {"b": plain[: shamir.SHARE_BYTES], "sk": plain[shamir.SHARE_BYTES :]}
            for kind, prefix in (("b", Key.SEED_COMMIT_PREFIX), ("sk", Key.KEY_COMMIT_PREFIX)):
                committed = share_commitment(run, server_round, (sender, me), kind, halves[kind])
                if inbox.get(prefix + sender) != committed:
                    raise SecAggRefused(
                        f"the share from node {sender} does not match the commitment it gave "
                        "the coordinator"
                    )
            self.state[f"share-b.{sender}"] = halves["b"]
            self.state[f"share-sk.{sender}"] = halves["sk"]
        self.state["senders"] = sorted(sealed)

    def mask(
        self, server_round: int, update: np.ndarray, examples: float, terms: bytes
    ) -> tuple[np.ndarray, int]:
        """The masked encoding of the flat float update weighted by this hospital itself,
        and how many values were clipped.

        Once per round only: a second request would mask a second update with the
        same masks, and the difference of the two would be in the clear. Pairwise
        masks are added for exactly the neighbours whose shares arrived; fewer than
        threshold - 1 of them, and the coordinator could rebuild this hospital's
        masks with the shares it already holds, so none is sent. `terms` is the
        round's digest (round_terms.round_digest): pairwise masks derived under
        other terms than a neighbour's do not cancel.
        """
        self._check_round(server_round)
        if self.state.get("masked"):
            raise SecAggRefused(
                f"this hospital already sent its masked update of round {server_round}"
            )
        senders = list(self.state.get("senders", []))
        needed = int(self.state["threshold"]) - 1
        if len(senders) < needed:
            raise SecAggRefused(
                f"only {len(senders)} neighbours' shares arrived; {needed} are needed "
                "before this hospital masks its update"
            )
        me = str(self.state["node"])
        run = int(self.state["run"])
        ratio = (
            1.0
            if self.state["equal-weights"]
            else weight_ratio(examples, float(self.state["max-weight"]))
        )
        self.state["masked"] = True  # before anything can fail: never a second attempt
        masked, clipped = encode(
            update,
            ratio,
            float(self.state["clipping-range"]),
            int(self.state["bits"]),
            int(self.state["participants"]),
        )
        scratch = Scratch()
        MaskStream(self.state["seed"]).apply(masked, True, scratch)
        purpose, own = mask_purpose(run, server_round, terms), public_key(self.state["s-sk"])
        for other in senders:
            theirs = bytes(self.state[f"s-pk.{other}"])
            label = pair_label(purpose, ((me, own), (other, theirs)))
            MaskStream(derive(self.state["s-sk"], theirs, label)).apply(
                masked, pairwise_sign(me, other), scratch
            )
        return masked, clipped

    def _checked_view(
        self, server_round: int, survivors: list[str], dropped: list[str]
    ) -> tuple[set[str], set[str]]:
        """The view of the round the coordinator gives, checked against what this hospital
        saw itself; returns (its group, the members it masked with, itself included)."""
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
        if not group <= set(survivors) | set(dropped):
            raise SecAggRefused(
                "members of this hospital's group are neither survivors nor dropped"
            )
        if len(set(survivors)) < SECAGG_MIN_PARTICIPANTS:
            raise SecAggRefused(
                f"only {len(set(survivors))} survivors: with fewer than "
                f"{SECAGG_MIN_PARTICIPANTS} one could learn another's update from the sum"
            )
        alive = [n for n in survivors if n in group]
        if len(alive) < int(self.state["threshold"]):
            raise SecAggRefused(
                f"only {len(alive)} of this hospital's group survived; "
                f"threshold is {self.state['threshold']}"
            )
        unmasked = sorted(n for n in survivors if n in group and n not in held)
        if unmasked:
            # Bonawitz et al.'s U3 within U2: a survivor this hospital did not mask with
            # would leave its update bare once the others' masks are removed
            raise SecAggRefused(
                f"survivors {unmasked[:3]} are neighbours this hospital did not mask with "
                "(their shares never reached it)"
            )
        return group, held

    def _view_tag(self, sender: str, receiver: str, view: bytes) -> bytes:
        """The tag `sender` gives `receiver` over a view of the round, under a key only
        the two of them derive (the coordinator relays, it cannot forge). The direction
        is inside the MAC: with one key per pair, an undirected tag could be reflected,
        a hospital's own tag handed back to it as its neighbour's agreement."""
        me = str(self.state["node"])
        other = receiver if sender == me else sender
        purpose = consistency_purpose(int(self.state["run"]), int(self.state["round"]))
        theirs = bytes(self.state[f"c-pk.{other}"])
        own = public_key(self.state["c-sk"])
        key = derive(self.state["c-sk"], theirs, pair_label(purpose, ((me, own), (other, theirs))))
        direction = f"{sender}>{receiver}\n".encode()
        return hmac.new(key, direction + view, hashlib.sha256).digest()

    def confirm(
        self, server_round: int, survivors: list[str], dropped: list[str]
    ) -> dict[str, bytes]:
        """Commit to the round's view (once: a second, different view is refused) and tag it
        for each neighbour among the survivors, for the consistency check of `unmask`."""
        group, held = self._checked_view(server_round, survivors, dropped)
        view = round_view(survivors, dropped)
        committed = self.state.get("view")
        if committed is not None and bytes(committed) != view:
            raise SecAggRefused(
                "the coordinator already gave this hospital another view of the round"
            )
        self.state["view"] = view
        me = str(self.state["node"])
        return {
            Key.TAG_PREFIX + other: self._view_tag(me, other, view)
            for other in sorted(set(survivors) & group & held - {me})
        }

    def unmask(
        self,
        server_round: int,
        survivors: list[str],
        dropped: list[str],
        tags: Mapping[str, bytes] | None = None,
    ) -> dict[str, bytes]:
        """Seed shares of surviving neighbours, key shares of dropped ones; never both.

        When neighbours whose shares it holds dropped (it would hand out key shares),
        the shares go out only after the consistency check:
        this hospital committed to this very view (`confirm`) and at least
        threshold - 1 of its surviving neighbours tagged the same view. Each
        hospital commits to one view, so no two views of a round can both gather a
        strict majority of a group: a coordinator telling hospitals different
        survivor lists cannot collect a seed share and the keys of its masks. The
        state is deleted by the caller right after: asking again gets nothing.
        """
        group, held = self._checked_view(server_round, survivors, dropped)
        me = str(self.state["node"])
        if set(dropped) & held - {me}:  # it would hand out key shares
            self._check_consistent(round_view(survivors, dropped), survivors, group, tags or {})
        shares = {}
        for node in survivors:
            if node in held:
                shares[Key.SEED_SHARE_PREFIX + node] = self.state[f"share-b.{node}"]
        for node in dropped:
            if node in held and node != me:
                shares[Key.KEY_SHARE_PREFIX + node] = self.state[f"share-sk.{node}"]
        return shares

    def _check_consistent(
        self, view: bytes, survivors: list[str], group: set[str], tags: Mapping[str, bytes]
    ) -> None:
        committed = self.state.get("view")
        if committed is None or bytes(committed) != view:
            raise SecAggRefused(
                "neighbours dropped, but this hospital did not confirm this view of the round"
            )
        me = str(self.state["node"])
        agreeing = [
            other
            for other in sorted(set(survivors) & group - {me})
            if f"c-pk.{other}" in self.state
            and hmac.compare_digest(
                bytes(tags.get(Key.TAG_PREFIX + other, b"")), self._view_tag(other, me, view)
            )
        ]
        needed = int(self.state["threshold"]) - 1
        if len(agreeing) < needed:
            raise SecAggRefused(
                f"only {len(agreeing)} neighbours confirmed the same view of the round; "
                f"{needed} are needed before shares of dropped neighbours go out"
            )


def round_view(survivors: list[str], dropped: list[str]) -> bytes:
    """The round's outcome as the coordinator tells it, one byte string for any order."""
    return (
        "survivors="
        + ",".join(sorted(set(survivors), key=int))
        + "|dropped="
        + ",".join(sorted(set(dropped), key=int))
    ).encode()
