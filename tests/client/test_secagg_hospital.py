"""The hospital's own SecAgg+ checks: shares only its neighbour opens, unsafe requests refused."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from medfed.client.privacy.secagg_hospital import HospitalSecAgg, SecAggRefused, ShareRequest
from medfed.shared_models.protocol import share_context
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import derive, open_sealed
from medfed.shared_models.secagg.quantize import Encoding
from tests.in_process_grid import RUN_ID

ENCODING = Encoding(clipping_range=16.0, bits=30, max_weight=1000.0, equal_weights=False)


def request(xs, keys, threshold: int, participants: int) -> ShareRequest:
    """Round 1's share request."""
    return ShareRequest(
        server_round=1, xs=xs, neighbour_keys=keys, threshold=threshold, participants=participants
    )


def test_shares_open_only_for_their_neighbour_and_tampering_is_rejected():
    clients = {}
    publics = {}
    for node in ("11", "22", "33"):
        clients[node], publics[node] = HospitalSecAgg.start(RUN_ID, 1, node)
    xs = {"11": 1, "22": 2, "33": 3}
    keys = {n: (publics[n]["c-pk"], publics[n]["s-pk"]) for n in xs}
    sealed = {
        node: client.share_keys(request(xs, {o: keys[o] for o in xs if o != node}, 2, 3), ENCODING)
        for node, client in clients.items()
    }
    to_22 = sealed["11"]["22"]
    terms = ENCODING.terms(3, 2)
    context = share_context(RUN_ID, 1, ("11", "22"), terms)
    right = derive(clients["22"].state["c-sk"], publics["11"]["c-pk"], b"share")
    assert len(open_sealed(right, to_22, context)) == 2 * shamir.SHARE_BYTES
    wrong = derive(clients["33"].state["c-sk"], publics["11"]["c-pk"], b"share")
    with pytest.raises(InvalidTag):
        open_sealed(wrong, to_22, context)
    with pytest.raises(InvalidTag):  # right key, but presented as sent to someone else
        open_sealed(right, to_22, share_context(RUN_ID, 1, ("11", "33"), terms))
    with pytest.raises(InvalidTag):  # right key and route, other round terms
        open_sealed(right, to_22, share_context(RUN_ID, 1, ("11", "22"), ENCODING.terms(4, 2)))
    tampered = bytearray(to_22)
    tampered[20] ^= 0x40
    with pytest.raises(SecAggRefused, match="from node 11 failed authentication"):
        clients["22"].receive_shares(1, {"11": bytes(tampered), "33": sealed["33"]["22"]})


def test_hospitals_refuse_unsafe_thresholds_and_repeated_keys():
    client, _ = HospitalSecAgg.start(RUN_ID, 1, "1")
    others = {str(i): HospitalSecAgg.start(RUN_ID, 1, str(i))[1] for i in (2, 3, 4)}
    xs = {"1": 1, "2": 2, "3": 3, "4": 4}
    keys = {n: (p["c-pk"], p["s-pk"]) for n, p in others.items()}
    with pytest.raises(SecAggRefused, match="threshold 2 for a group of 4 is unsafe"):
        client.share_keys(request(xs, keys, 2, 4), ENCODING)
    keys["3"] = keys["2"]
    with pytest.raises(SecAggRefused, match="public keys repeat"):
        client.share_keys(request(xs, keys, 3, 4), ENCODING)
