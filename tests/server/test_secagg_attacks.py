"""SecAgg+ against a coordinator that deviates from the protocol, and against hospitals
whose replies are malformed: no single update comes out, and a bad reply drops its
hospital, never the round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from medfed.client.privacy.disclosure import SiteCounts
from medfed.client.privacy.secagg_hospital import HospitalSecAgg, SecAggRefused
from medfed.server.secure_aggregation import SecureOutcome
from medfed.server.unmasking import SecAggAbort, plan_round
from medfed.shared_models.protocol import Key, Metric, NodeConfig, Record, SiteKey
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.quantize import weight_scale
from tests.in_process_grid import InProcessGrid, secure_config, train_messages
from tests.server.test_secure_aggregation import (
    SHAPES,
    assert_mean_of,
    federation,
    random_updates,
    run_round,
    workflow,
)


def secrets_held(grid: InProcessGrid) -> dict[int, list[str]]:
    """The SecAgg+ records still in each hospital's node state."""
    return {
        node: [k for k in context.state.config_records if k.startswith("medfed-secagg")]
        for node, context in grid.contexts.items()
    }


def test_the_coordinator_cannot_choose_the_hospitals_weights():
    """A coordinator that wants one victim's update alone would weigh everyone else near
    zero. Hospitals weigh themselves inside the masked vector: whatever weights the
    coordinator puts in its messages, the result is the mean weighted by the hospitals."""
    updates, weights, start, grid, cfg, secure = federation(4, seed=21)
    original = secure._share_content

    def weigh_the_victim_alone(prepared, node):
        content = original(prepared, node)
        victim = prepared.plan.participants[0]
        content[Record.CONFIG]["weight"] = 1.0 if node == victim else 1e-12
        content[Record.CONFIG]["fraction"] = 1.0 if node == victim else 1e-12
        return content

    secure._share_content = weigh_the_victim_alone
    outcome = run_round(grid, start, cfg, secure)
    assert_mean_of(outcome, updates, weights, list(updates))


def test_a_replayed_upload_request_gets_no_second_masked_update():
    """The replay attack: an upload request first with an empty inbox, then again. The
    hospital refuses to mask with fewer than threshold - 1 neighbours' shares, and never
    masks a second update of the same round."""
    updates, _, start, grid, _, secure = federation(4, seed=22)
    nodes = list(updates)
    prepared = secure._set_up(1, [str(n) for n in nodes], SecureOutcome())
    victim = nodes[0]
    message = train_messages([victim], start)[0]
    empty = _upload_message(message, {})
    grid.push_messages([empty])
    refused = grid.pull_messages([empty.metadata.message_id])[0]
    assert refused.has_error() and "neighbours' shares arrived" in refused.error.reason
    inbox = {
        Key.FROM_PREFIX + sender: sealed[Key.TO_PREFIX + str(victim)]
        for sender, sealed in prepared.shared.items()
        if Key.TO_PREFIX + str(victim) in sealed
    }
    first, again = _upload_message(message, inbox), _upload_message(message, inbox)
    grid.push_messages([first, again])
    replies = grid.pull_messages([first.metadata.message_id, again.metadata.message_id])
    assert not replies[0].has_error() and Key.MASKED_ARRAY in replies[0].content["arrays"]
    assert replies[1].has_error() and "already sent its masked update" in replies[1].error.reason


def test_a_split_survivor_graph_aborts_before_any_share_is_asked_for():
    """SecAgg+ neighbourhoods (10 hospitals, 4 neighbours): dropouts that split the
    survivors into two pieces would let unmasking reveal each piece's sum. The round
    aborts instead, no unmask request goes out, and every hospital forgets its secrets."""
    updates, weights, start = random_updates(10, seed=23)
    grid = InProcessGrid(updates, weights)
    cfg = secure_config(**{"secagg-neighbours": 4, "secagg-threshold": 3})
    secure = workflow(grid, cfg)
    run_round(grid, start, cfg, secure, server_round=1)  # round 2 is planned during round 1
    plan = secure.prepared.plan
    ring = _ring(plan)
    cut = {ring[0], ring[1], ring[5], ring[6]}  # two gaps of two: two arcs of three
    grid.drop["upload"] = {int(n) for n in cut}
    seen_before = len(grid.seen)
    with pytest.raises(SecAggAbort, match="split the surviving hospitals' neighbourhoods"):
        run_round(grid, start, cfg, secure, server_round=2)
    round_two = grid.seen[seen_before:]
    assert not [m for m in round_two if Record.SECAGG in m.content and _is_unmask(m)]
    assert all(held == [] for held in secrets_held(grid).values())


def test_two_hospitals_are_refused_on_both_sides():
    """With two hospitals each would learn the other's update from the sum."""
    with pytest.raises(ValueError, match="at least 3"):
        plan_round(["1", "2"], 0, 0)
    updates, weights, start = random_updates(2, seed=24)
    grid = InProcessGrid(updates, weights)
    with pytest.raises(SecAggAbort, match="at least 3"):
        run_round(grid, start, secure_config())
    state, _ = HospitalSecAgg.start(7, 1, "1")
    state.state.update({"masked": True, "neighbours": ["2", "3"], "threshold": 2})
    with pytest.raises(SecAggRefused, match="only 2 survivors"):
        state.unmask(1, ["1", "2"], ["3"])


def test_an_aborted_round_leaves_no_secret_at_the_hospitals():
    updates, weights, start = random_updates(5, seed=25)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.drop["upload"] = set(nodes[:3])  # 2 left of 5: the round aborts after sharing
    with pytest.raises(SecAggAbort):
        run_round(grid, start, secure_config())
    assert all(held == [] for held in secrets_held(grid).values())


def _remove(record: str):
    def corrupt(reply: Message) -> Message:
        del reply.content[record]
        return reply

    return corrupt


def _set(record: str, key: str, value):
    def corrupt(reply: Message) -> Message:
        reply.content[record][key] = value
        return reply

    return corrupt


def _drop_key(record: str, prefix: str):
    def corrupt(reply: Message) -> Message:
        target = reply.content[record]
        del target[next(k for k in target if k.startswith(prefix))]
        return reply

    return corrupt


def _shares(transform):
    def corrupt(reply: Message) -> Message:
        record = reply.content[Record.SECAGG]
        for key in list(record):
            record[key] = transform(record[key])
        return reply

    return corrupt


def _masked(vector):
    def corrupt(reply: Message) -> Message:
        reply.content[Record.ARRAYS] = ArrayRecord({Key.MASKED_ARRAY: Array(vector)})
        return reply

    return corrupt


def _masked_bytes(data: bytes):
    def corrupt(reply: Message) -> Message:
        array = Array(dtype="uint32", shape=(VECTOR,), stype="numpy.ndarray", data=data)
        reply.content[Record.ARRAYS] = ArrayRecord({Key.MASKED_ARRAY: array})
        return reply

    return corrupt


VECTOR = sum(int(np.prod(shape)) for shape in SHAPES.values()) + 1  # the update and its weight
MALFORMED = {
    "advertise: no keys": ("advertise", _remove(Record.SECAGG)),
    "advertise: a key that is text": ("advertise", _set(Record.SECAGG, Key.C_PK, "a key")),
    "advertise: a key of 5 bytes": ("advertise", _set(Record.SECAGG, Key.S_PK, b"short")),
    "share: no shares": ("share", _remove(Record.SECAGG)),
    "share: a neighbour's share missing": ("share", _drop_key(Record.SECAGG, Key.TO_PREFIX)),
    "share: a share that is a number": ("share", _shares(lambda v: 7 if len(v) > 32 else v)),
    "share: no seed hash": ("share", _drop_key(Record.SECAGG, Key.SEED_HASH)),
    "upload: no arrays": ("upload", _remove(Record.ARRAYS)),
    "upload: float32 instead of uint32": ("upload", _masked(np.zeros(VECTOR, np.float32))),
    "upload: a vector too short": ("upload", _masked(np.zeros(10, np.uint32))),
    "upload: bytes that are no array": ("upload", _masked_bytes(b"\x93NUMPY garbage")),
    "upload: a site record without a name": ("upload", _drop_key(Record.SITE, SiteKey.NAME)),
    "upload: a site name that is a path": ("upload", _set(Record.SITE, SiteKey.NAME, "/srv/a")),
    "upload: no metrics": ("upload", _remove(Record.METRICS)),
    "upload: a NaN weight": ("upload", _set(Record.METRICS, Metric.WEIGHT, float("nan"))),
    "upload: a negative weight": ("upload", _set(Record.METRICS, Metric.WEIGHT, -3.0)),
    "upload: a zero weight": ("upload", _set(Record.METRICS, Metric.WEIGHT, 0.0)),
    "unmask: no shares": ("unmask", _remove(Record.SECAGG)),
    "unmask: shares that are text": ("unmask", _shares(lambda v: "garbage")),
    "unmask: shares of the wrong size": ("unmask", _shares(lambda v: b"\x01" * 10)),
    "unmask: a share it was not asked for": ("unmask", _set(Record.SECAGG, "b.999", b"x" * 66)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_drops_its_hospital_and_the_round_goes_on(case):
    stage, corrupt = MALFORMED[case]
    updates, weights, start = random_updates(5, seed=26)
    nodes = list(updates)
    culprit = nodes[2]
    grid = InProcessGrid(updates, weights)
    grid.corrupt[(stage, culprit)] = corrupt
    outcome = run_round(grid, start, secure_config())
    assert outcome.failed[culprit].startswith(f"{stage}: "), outcome.failed
    assert set(outcome.failed) == {culprit}
    counted = nodes if stage == "unmask" else [n for n in nodes if n != culprit]
    assert_mean_of(outcome, updates, weights, counted)


def test_wrong_shares_of_the_right_size_are_never_used():
    """Well-formed but wrong shares (a broken or lying hospital): every rebuilt secret is
    checked against its owner's commitment, so the round still unmasks exactly."""
    updates, weights, start = random_updates(5, seed=27)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    grid.corrupt[("unmask", nodes[1])] = _shares(lambda v: bytes(b ^ 0x5A for b in v))
    outcome = run_round(grid, start, secure_config())
    assert_mean_of(outcome, updates, weights, nodes)


def test_a_copied_public_key_drops_both_copies():
    """No public key is used twice: a hospital advertising another's key drops both."""
    updates, weights, start = random_updates(5, seed=28)
    nodes = list(updates)
    grid = InProcessGrid(updates, weights)
    copied = {}

    def remember(reply: Message) -> Message:
        copied["c-pk"] = reply.content[Record.SECAGG][Key.C_PK]
        return reply

    grid.corrupt[("advertise", nodes[0])] = remember
    grid.corrupt[("advertise", nodes[1])] = lambda r: _set(Record.SECAGG, Key.C_PK, copied["c-pk"])(
        r
    )
    outcome = run_round(grid, start, secure_config())
    assert set(outcome.failed) == {nodes[0], nodes[1]}
    assert_mean_of(outcome, updates, weights, nodes[2:])


def _upload_message(template: Message, inbox: dict) -> Message:
    content = RecordDict(dict(template.content.items()))
    content[Record.SECAGG] = ConfigRecord(inbox)
    return Message(content=content, dst_node_id=template.metadata.dst_node_id, message_type="train")


def _ring(plan) -> list[str]:
    """The hospitals in ring order, recovered from a degree-4 neighbour graph: two
    hospitals next to each other on the ring share two neighbours, others fewer."""
    ring = [plan.participants[0]]
    while len(ring) < len(plan.participants):
        here = set(plan.neighbours[ring[-1]])
        ring.append(
            next(
                n for n in sorted(here - set(ring))
                if len(set(plan.neighbours[n]) & here) == 2
            )
        )  # fmt: skip
    return ring


def _is_unmask(message: Message) -> bool:
    return any(key.startswith((Key.SEED_SHARE_PREFIX, Key.KEY_SHARE_PREFIX))
               for key in message.content[Record.SECAGG])  # fmt: skip


def test_a_hospital_never_hands_out_both_secrets_of_one_neighbour():
    """Seed share and mask-key share of the same hospital together unmask its update: a
    request naming a hospital both survivor and dropped is refused, and so is an unmask
    request to a hospital that never uploaded (nothing to protect the sum with)."""
    hospital, _ = HospitalSecAgg.start(7, 1, "1")
    hospital.state.update({"neighbours": ["2", "3", "4"], "threshold": 3})
    with pytest.raises(SecAggRefused, match="sent no masked update"):
        hospital.unmask(1, ["1", "2", "3", "4"], [])
    hospital.state["masked"] = True
    with pytest.raises(SecAggRefused, match="both as survivor and as dropped"):
        hospital.unmask(1, ["1", "2", "3", "4"], ["2"])


def test_a_hospital_cannot_be_given_round_terms_of_its_own():
    """The victim is told the true number of hospitals, the others a huge one: their
    encodings would scale to nothing and the "aggregate" be the victim's update. The
    round's terms are bound into every share ciphertext, so hospitals told different
    terms cannot open each other's shares: nobody masks, nothing is unmasked."""
    updates, _, start, grid, cfg, secure = federation(4, seed=21)
    original = secure._share_content

    def scale_everyone_else_away(prepared, node):
        content = original(prepared, node)
        if node != prepared.plan.participants[0]:
            content[Record.CONFIG][Key.PARTICIPANTS] = 5_000
        return content

    secure._share_content = scale_everyone_else_away
    with pytest.raises(SecAggAbort, match="upload stage"):
        run_round(grid, start, cfg, secure)
    uploads = [m for m in grid.seen if not m.has_error() and Record.ARRAYS in m.content]
    assert uploads == [], "no hospital masked under terms its neighbours did not share"
    refusals = [m.error.reason for m in grid.seen if m.has_error()]
    assert len(refusals) == len(updates) and all("round terms" in r for r in refusals)


def test_a_round_too_large_to_encode_is_refused():
    with pytest.raises(ValueError, match="at most 10000"):
        plan_round([str(n) for n in range(1, 10_002)], 4, 0)


def _same_as_own(xs: dict, victim: str, colluder: str):
    return xs[victim]


@pytest.mark.parametrize(
    "coordinate",
    [str(shamir.PRIME), shamir.PRIME - 2**62, 0, -1, 2**40, "3", 2.0, _same_as_own],
    ids=["prime-as-text", "huge", "zero", "negative", "beyond-2**31", "text", "float", "dup"],
)
def test_shamir_coordinates_that_would_reveal_a_secret_are_refused(coordinate):
    """A share at x = 0 (or any multiple of the prime) is the secret itself: with it, one
    colluding hospital would hold the victim's seed and mask key. The victim refuses any
    x that is not a small positive integer of its own, and drops out of the round."""
    updates, weights, start, grid, cfg, secure = federation(4, seed=31)
    original = secure._share_content
    roles = {}

    def give_the_colluder_a_bad_x(prepared, node):
        content = original(prepared, node)
        victim, colluder = prepared.plan.participants[:2]
        if prepared.server_round != 1:  # the next round, prepared during this one
            return content
        roles.update(victim=int(victim))
        if node == victim:
            x = (
                coordinate(prepared.plan.xs, victim, colluder)
                if callable(coordinate)
                else coordinate
            )
            content[Record.SECAGG][Key.X_PREFIX + colluder] = x
        return content

    secure._share_content = give_the_colluder_a_bad_x
    outcome = run_round(grid, start, cfg, secure)
    reason = outcome.failed[roles["victim"]]
    assert reason.startswith("share: ") and "x-coordinate" in reason, reason
    assert_mean_of(outcome, updates, weights, [n for n in updates if n != roles["victim"]])


def _shift_masked(values: slice, shift):
    def corrupt(reply: Message) -> Message:
        masked = reply.content[Record.ARRAYS][Key.MASKED_ARRAY].numpy().copy()
        masked[values] += np.uint32(shift(masked.size) % 2**32)
        reply.content[Record.ARRAYS] = ArrayRecord({Key.MASKED_ARRAY: Array(masked)})
        return reply

    return corrupt


@pytest.mark.parametrize(
    ("dp", "values", "shift"),
    [
        (False, slice(None, -1), lambda size: 2**30),  # the update: far past the range
        (False, slice(-1, None), lambda size: 2**30),  # the weight: beyond n full weights
        # under DP every weight is 1: shrink the total to almost nothing, inflating the mean
        (True, slice(-1, None), lambda size: -(4 * weight_scale(4) - 1)),
    ],
    ids=["update", "weight", "dp-weight"],
)
def test_an_upload_that_is_no_honest_encoding_aborts_the_round(dp, values, shift):
    """Masks cancel additively, so a hospital can add anything to its upload. What an
    honest sum must satisfy is checked when it is unmasked: weights in [1/max, 1] each
    (exactly 1 under DP), a mean within the clipping range. Such a round is aborted:
    the culprit cannot be named (that would need a proof per upload), but the model
    never takes the pushed mean."""
    updates, weights, start = random_updates(4, seed=33)
    cfg = secure_config(**({"dp.mode": "client"} if dp else {}))
    grid = InProcessGrid(updates, weights, cfg)
    grid.corrupt[("upload", list(updates)[1])] = _shift_masked(values, shift)
    with pytest.raises(SecAggAbort, match="not a valid encoding"):
        run_round(grid, start, cfg)


def test_the_masked_weight_obeys_the_sites_floor():
    """A site with 3 examples sends 10 (its floor) as its weight in the clear; inside the
    masked vector it weighs 10 too, or the weight sum would tell the 3."""
    updates, weights, start = random_updates(4, seed=34)
    small = next(iter(updates))
    weights[small] = 3.0
    grid = InProcessGrid(updates, weights)
    grid.site_counts[small] = SiteCounts(3, 1)
    for context in grid.contexts.values():
        context.node_config[NodeConfig.MIN_COUNT] = 10
    outcome = run_round(grid, start, secure_config())
    assert_mean_of(outcome, updates, {**weights, small: 10.0}, list(updates))
