"""The hospital's own SecAgg+ checks: shares only its neighbour opens, unsafe requests refused."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from medfed.client.privacy.secagg_hospital import (
    HospitalSecAgg,
    RunTerms,
    SecAggRefused,
    ShareRequest,
)
from medfed.shared_models.protocol import (
    Key,
    pair_label,
    share_context,
    share_purpose,
    share_terms,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import CURVE_PRIME, derive, open_sealed
from medfed.shared_models.secagg.quantize import Encoding
from tests.in_process_grid import RUN_ID

ENCODING = Encoding(clipping_range=16.0, bits=30, max_weight=1000.0, equal_weights=False)
RUN_CONFIG = b"\x07" * 32  # the digest of the run's config every hospital holds
TERMS = RunTerms(ENCODING, RUN_CONFIG, whole_group=True)


def request(xs, keys, threshold: int, participants: int) -> ShareRequest:
    """Round 1's share request."""
    return ShareRequest(
        server_round=1, xs=xs, neighbour_keys=keys, threshold=threshold, participants=participants
    )


def three_hospitals():
    """Hospitals 11, 22, 33 after sharing round 1's keys: states, public keys, share replies."""
    clients, publics = {}, {}
    for node in ("11", "22", "33"):
        clients[node], publics[node] = HospitalSecAgg.start(RUN_ID, 1, node)
    xs = {"11": 1, "22": 2, "33": 3}
    keys = {n: (publics[n]["c-pk"], publics[n]["s-pk"]) for n in xs}
    replies = {
        node: client.share_keys(request(xs, {o: keys[o] for o in xs if o != node}, 2, 3), TERMS)
        for node, client in clients.items()
    }
    return clients, publics, replies


def share_key(clients, publics, holder: str, dealer: str) -> bytes:
    """The key `holder` derives for the shares `dealer` sealed to it in round 1."""
    label = pair_label(
        share_purpose(RUN_ID, 1),
        ((holder, publics[holder]["c-pk"]), (dealer, publics[dealer]["c-pk"])),
    )
    return derive(clients[holder].state["c-sk"], publics[dealer]["c-pk"], label)


def inbox_of(replies, holder: str, dealers) -> dict[str, bytes]:
    """What the coordinator relays to `holder`: each dealer's ciphertext and commitments."""
    inbox = {}
    for dealer in dealers:
        inbox[Key.FROM_PREFIX + dealer] = replies[dealer][Key.TO_PREFIX + holder]
        for prefix in (Key.SEED_COMMIT_PREFIX, Key.KEY_COMMIT_PREFIX):
            inbox[prefix + dealer] = replies[dealer][prefix + holder]
    return inbox


def test_shares_open_only_for_their_neighbour_and_tampering_is_rejected():
    clients, publics, replies = three_hospitals()
    to_22 = replies["11"][Key.TO_PREFIX + "22"]
    terms = share_terms(ENCODING.terms(3, 2), RUN_CONFIG)
    context = share_context(RUN_ID, 1, ("11", "22"), terms)
    right = share_key(clients, publics, "22", "11")
    assert len(open_sealed(right, to_22, context)) == 2 * shamir.SHARE_BYTES
    wrong = share_key(clients, publics, "33", "11")
    with pytest.raises(InvalidTag):
        open_sealed(wrong, to_22, context)
    with pytest.raises(InvalidTag):  # right key, but presented as sent to someone else
        open_sealed(right, to_22, share_context(RUN_ID, 1, ("11", "33"), terms))
    with pytest.raises(InvalidTag):  # right key and route, other round terms
        other = share_terms(ENCODING.terms(4, 2), RUN_CONFIG)
        open_sealed(right, to_22, share_context(RUN_ID, 1, ("11", "22"), other))
    with pytest.raises(InvalidTag):  # right key and route, another run config
        other = share_terms(ENCODING.terms(3, 2), b"\x08" * 32)
        open_sealed(right, to_22, share_context(RUN_ID, 1, ("11", "22"), other))
    inbox = inbox_of(replies, "22", ["11", "33"])
    tampered = bytearray(to_22)
    tampered[20] ^= 0x40
    with pytest.raises(SecAggRefused, match="from node 11 failed authentication"):
        clients["22"].receive_shares(1, {**inbox, Key.FROM_PREFIX + "11": bytes(tampered)})


def test_a_share_that_is_not_the_one_committed_names_its_dealer():
    """A dealer that seals one share but commits the coordinator to another would get an
    honest holder blamed at unmasking: the holder checks the commitment on receipt."""
    clients, _, replies = three_hospitals()
    inbox = inbox_of(replies, "22", ["11", "33"])
    clients["22"].receive_shares(1, inbox)  # honest: opens and matches
    for prefix in (Key.SEED_COMMIT_PREFIX, Key.KEY_COMMIT_PREFIX):
        lying = {**inbox, prefix + "11": bytes(32)}
        with pytest.raises(SecAggRefused, match="from node 11 does not match the commitment"):
            clients["22"].receive_shares(1, lying)


def test_hospitals_refuse_unsafe_thresholds_and_repeated_keys():
    client, _ = HospitalSecAgg.start(RUN_ID, 1, "1")
    others = {str(i): HospitalSecAgg.start(RUN_ID, 1, str(i))[1] for i in (2, 3, 4)}
    xs = {"1": 1, "2": 2, "3": 3, "4": 4}
    keys = {n: (p["c-pk"], p["s-pk"]) for n, p in others.items()}
    with pytest.raises(SecAggRefused, match="threshold 2 for a group of 4 is unsafe"):
        client.share_keys(request(xs, keys, 2, 4), TERMS)
    with pytest.raises(SecAggRefused, match="a round of 9 hospitals, but 4 in this"):
        client.share_keys(request(xs, keys, 3, 9), TERMS)
    keys["3"] = keys["2"]
    with pytest.raises(SecAggRefused, match="public keys repeat"):
        client.share_keys(request(xs, keys, 3, 4), TERMS)


@pytest.mark.parametrize(
    "bad",
    [
        bytes(32),  # u = 0: every shared secret is zero
        (1).to_bytes(32, "little"),  # u = 1, of small order
        (CURVE_PRIME - 1).to_bytes(32, "little"),  # u = p - 1, of order 2
        (CURVE_PRIME + 3).to_bytes(32, "little"),  # u >= p: another spelling of u = 3
        "set-bit-255",  # a valid key with the bit X25519 ignores set: the same key twice
    ],
    ids=["zero", "one", "p-1", "non-canonical", "bit-255"],
)
def test_a_neighbours_key_that_is_no_canonical_key_of_large_order_is_refused(bad):
    """Such a key makes the neighbour's derivations fail (or names one key twice): it is
    refused where it arrives, naming the neighbour, before any secret is dealt."""
    _, public = HospitalSecAgg.start(RUN_ID, 1, "2")
    if bad == "set-bit-255":
        bad = public["s-pk"][:-1] + bytes([public["s-pk"][-1] | 0x80])
    config = {"server-round": 1, Key.THRESHOLD: 2, Key.PARTICIPANTS: 3}
    secagg = {Key.X_PREFIX + n: x for n, x in (("1", 1), ("2", 2), ("3", 3))}
    secagg.update({Key.C_PK_PREFIX + "2": public["c-pk"], Key.S_PK_PREFIX + "2": bad})
    _, third = HospitalSecAgg.start(RUN_ID, 1, "3")
    secagg.update({Key.C_PK_PREFIX + "3": third["c-pk"], Key.S_PK_PREFIX + "3": third["s-pk"]})
    with pytest.raises(SecAggRefused, match="node 2's public key is refused"):
        ShareRequest.from_records(config, secagg)
