"""SecAgg+ against a coordinator that deviates from the protocol, and against hospitals
whose replies are malformed: no single update comes out, and a bad reply drops its
hospital, never the round."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from medfed.client.privacy.disclosure import SiteCounts
from medfed.client.privacy.secagg_hospital import HospitalSecAgg, SecAggRefused
from medfed.server.run.exchange import Exchange
from medfed.server.run.replies import ReplyCollector, SiteNames
from medfed.server.secagg.stage_replies import public_keys
from medfed.server.secagg.unmasking import MaskedSum, SecAggAbort, plan_round
from medfed.server.secagg.workflow import SecureAggregation, SecureOutcome, _content
from medfed.shared_models.protocol import (
    Key,
    Metric,
    NodeConfig,
    Record,
    SiteKey,
    Stage,
    mask_purpose,
)
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.quantize import Encoding, encoded_weight, weight_scale
from tests.in_process_grid import RUN_ID, InProcessGrid, secure_config, train_messages
from tests.server.secagg.test_workflow import (
    SHAPES,
    assert_mean_of,
    federation,
    global_model,
    random_updates,
    run_round,
    workflow,
)

ENCODING = Encoding(clipping_range=16.0, bits=30, max_weight=1000.0, equal_weights=False)


def secrets_held(grid: InProcessGrid) -> dict[int, list[str]]:
    """The SecAgg+ records still in each hospital's node state."""
    return {
        node: [k for k in context.state.config_records if k.startswith("medfed-secagg")]
        for node, context in grid.contexts.items()
    }


def _with_config(**values):
    """A request rewrite setting `values` in this one message's config (a copy: a strategy's
    messages share one content object)."""

    def alter(message: Message) -> Message:
        content = RecordDict(dict(message.content.items()))
        content[Record.CONFIG] = ConfigRecord({**dict(message.content[Record.CONFIG]), **values})
        return Message(
            content=content, dst_node_id=message.metadata.dst_node_id, message_type="train"
        )

    return alter


@pytest.mark.parametrize(
    ("run", "setting"),
    [
        # FedProx: the victim trains freely, everyone else is pinned to the start, so the
        # "mean" is the victim's update (cosine 0.96 with it in the attack)
        ({"strategy": "fedprox"}, lambda victim: {"proximal-mu": 0.0 if victim else 1000.0}),
        # a weight in the message, for hospitals that would read one
        ({}, lambda victim: {"aggregation-weight": 1.0 if victim else 1e-12}),
        # a DP clipping norm in a run without DP: clip everyone else to nothing
        ({}, lambda victim: {"clipping_norm": 1e6 if victim else 1e-9}),
        # under DP: another clipping norm than the run's, per hospital
        ({"dp.mode": "client"}, lambda victim: {"clipping_norm": 1e6 if victim else 1e-9}),
    ],
    ids=["proximal-mu", "weight", "clip-without-dp", "clip-under-dp"],
)
def test_the_coordinator_cannot_choose_the_hospitals_weights(run, setting):
    """A coordinator that wants one victim's update alone would weigh everyone else near
    zero, through whatever shapes an update: a weight, FedProx's mu, a clipping norm, each
    chosen per hospital. Every setting a training message carries must be the run's own:
    each hospital told otherwise refuses before training, and nothing is unmasked."""
    updates, weights, start = random_updates(4, seed=21)
    cfg = secure_config(**run)
    grid = InProcessGrid(updates, weights, cfg)
    victim = next(iter(updates))
    for node in updates:
        grid.alter[("upload", node)] = _with_config(**setting(node == victim))
    with pytest.raises(SecAggAbort, match="upload stage"):
        run_round(grid, start, cfg)
    assert not [m for m in grid.seen if not m.has_error() and Record.ARRAYS in m.content]
    refusals = [m.error.reason for m in grid.seen if m.has_error()]
    assert len(refusals) == 4 and all("RoundRefused" in r for r in refusals), refusals
    name = next(iter(setting(True)))
    assert sum(f"'{name}'" in r for r in refusals) >= 3  # every hospital not given the run's


def test_a_round_run_twice_gets_no_second_upload():
    """The attack: round 1 with {V, A, B, C}, then round 1 again with the same model and
    {A, B, C}. Training repeats bit for bit, so the difference of the two sums would be
    V's update. A, B and C refuse the second round 1: rounds only move forward at a
    hospital, whatever `advertise` or `abort` messages come between."""
    updates, weights, start, grid, cfg, secure = federation(4, seed=22)
    nodes = list(updates)
    assert_mean_of(run_round(grid, start, cfg, secure), updates, weights, nodes)
    grid.push_messages(
        [Message(content=RecordDict({Record.CONFIG: ConfigRecord({"server-round": 1})}),
                 dst_node_id=n, message_type="train.secagg_abort") for n in nodes]
    )  # fmt: skip
    seen = len(grid.seen)
    again = workflow(grid, cfg)  # a fresh workflow: nothing prepared, all four exchanges
    template = {k: v.shape for k, v in start.items()}
    with pytest.raises(SecAggAbort, match="advertise stage"):
        again.train_round(1, train_messages(nodes[1:], start, 1), template)
    second = grid.seen[seen:]
    assert not [m for m in second if not m.has_error() and Record.ARRAYS in m.content]
    reasons = [m.error.reason for m in second if m.has_error()]
    assert len(reasons) == 3 and all("not after round 1" in r for r in reasons), reasons


def test_a_global_model_is_trained_on_once():
    """Round 2 with round 1's global model would repeat round 1's updates exactly."""
    updates, _weights, start, grid, cfg, secure = federation(4, seed=22)
    run_round(grid, start, cfg, secure)
    template = {k: v.shape for k, v in start.items()}
    messages = train_messages(list(updates), start, 2)  # round 1's model again
    with pytest.raises(SecAggAbort, match="upload stage"):
        secure.train_round(2, messages, template)
    reasons = [m.error.reason for m in grid.seen if m.has_error()]
    assert len(reasons) == 4 and all("already trained on" in r for r in reasons), reasons


def test_hospitals_given_different_models_produce_masks_that_do_not_cancel():
    """The victim gets the real global model, everyone else another one (one whose
    gradients vanish, say): the "sum" would be the victim's update. The pairwise masks
    are bound to the round's terms, the global model's hash among them: the victim's
    masks with the others do not cancel and what is unmasked is no sum at all."""
    updates, _weights, start, grid, cfg, secure = federation(4, seed=23)
    victim = next(iter(updates))
    others = {k: np.zeros_like(v) for k, v in start.items()}

    def other_model(message: Message) -> Message:
        # the deviating coordinator sends the other model's arrays unpacked (hospitals take
        # both forms)
        content = RecordDict({k: v for k, v in message.content.items() if k != Record.LAYOUT})
        content[Record.ARRAYS] = ArrayRecord({k: Array(v) for k, v in others.items()})
        return Message(
            content=content, dst_node_id=message.metadata.dst_node_id, message_type="train"
        )

    for node in updates:
        if node != victim:
            grid.alter[("upload", node)] = other_model
    with pytest.raises(SecAggAbort, match="clear weights say"):
        run_round(grid, start, cfg, secure)


def test_a_replayed_upload_request_gets_no_second_masked_update():
    """The replay attack: an upload request first with an empty inbox, then again with
    the shares. The hospital refuses to mask with fewer than threshold - 1 neighbours'
    shares, and refuses the round once asked: it is recorded before training. A second
    masking of one round's state is refused as well (defence in depth)."""
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
    again = _upload_message(message, inbox)
    grid.push_messages([again])
    replies = grid.pull_messages([again.metadata.message_id])
    assert replies[0].has_error() and "not after round 1" in replies[0].error.reason
    state, _ = HospitalSecAgg.start(7, 1, "1")
    state.state.update({"masked": True})
    with pytest.raises(SecAggRefused, match="already sent its masked update"):
        state.mask(1, np.zeros(3, np.float32), 10.0, b"terms")


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


VECTOR = sum(int(np.prod(shape)) for shape in SHAPES.values()) + 2  # update, weight, clipped
MALFORMED = {
    "advertise: no keys": ("advertise", _remove(Record.SECAGG)),
    "advertise: a key that is text": ("advertise", _set(Record.SECAGG, Key.C_PK, "a key")),
    "advertise: a key of 5 bytes": ("advertise", _set(Record.SECAGG, Key.S_PK, b"short")),
    "advertise: no run config": ("advertise", _drop_key(Record.SECAGG, Key.RUN_CONFIG)),
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


@pytest.mark.parametrize("neighbours", [0, 2], ids=["everyone", "neighbourhoods"])
def test_a_hospital_cannot_be_given_round_terms_of_its_own(neighbours):
    """The victim is told the true number of hospitals, the others a huge one: their
    encodings would scale to nothing and the "aggregate" be the victim's update. With
    everyone in one group each hospital counts the group itself and refuses at once;
    with neighbourhoods the round's terms are bound into every share ciphertext, so
    hospitals told different terms cannot open each other's shares: neither the victim
    nor its neighbours mask, and nothing is unmasked."""
    updates, weights, start = random_updates(4, seed=21)
    cfg = secure_config(**{"secagg-neighbours": neighbours})
    grid = InProcessGrid(updates, weights, cfg)
    secure = workflow(grid, cfg)
    original = secure._share_content
    plans = []

    def scale_everyone_else_away(prepared, node):
        plans.append(prepared.plan)
        content = original(prepared, node)
        if node != prepared.plan.participants[0]:
            content[Record.CONFIG][Key.PARTICIPANTS] = 5_000
        return content

    secure._share_content = scale_everyone_else_away
    with pytest.raises(SecAggAbort, match="share stage" if neighbours == 0 else "upload stage"):
        run_round(grid, start, cfg, secure)
    victim = plans[0].participants[0]
    uploaders = {
        str(m.metadata.src_node_id)
        for m in grid.seen
        if not m.has_error() and Record.ARRAYS in m.content
    }
    assert not uploaders & plans[0].group(victim), "nobody masked under terms not shared"
    refusals = [m.error.reason for m in grid.seen if m.has_error()]
    expected = "a round of 5000 hospitals" if neighbours == 0 else "round terms"
    assert sum(expected in r for r in refusals) >= 3, refusals


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


def _to_the_floor(weights) -> Callable[[int], int]:
    """The shift of one weight slot that leaves the weights summing to their lowest allowed
    value: every hospital at 1 / max weight. The honest mean is then scaled up by the sum
    of the ratios over that floor (x667 in the attack)."""

    def shift(size: int) -> int:
        honest = sum(encoded_weight(w, ENCODING, 4) for w in weights.values())
        return 4 * math.floor(weight_scale(4) / 1000.0) - honest

    return shift


@pytest.mark.parametrize(
    ("dp", "values", "shift", "caught_by"),
    [
        (False, slice(None, -2), lambda weights: lambda size: 2**30, "not a valid encoding"),
        # the weight beyond n full weights, or down to the lowest sum every bound allows
        (False, slice(-2, -1), lambda weights: lambda size: 2**30, "clear weights say"),
        (False, slice(-2, -1), _to_the_floor, "clear weights say"),
        # under DP every weight is 1: shrink the total to almost nothing, inflating the mean
        (
            True,
            slice(-2, -1),
            lambda weights: lambda size: -(4 * weight_scale(4) - 1),
            "clear weights say",
        ),
    ],
    ids=["update", "weight", "weight-to-floor", "dp-weight"],
)
def test_an_upload_that_is_no_honest_encoding_aborts_the_round(dp, values, shift, caught_by):
    """Masks cancel additively, so a hospital can add anything to its upload. What an
    honest sum must satisfy is checked when it is unmasked: the weights sum to exactly
    what the hospitals' clear weights say (a weight slot written down to the floor once
    passed every sum-level bound and scaled the honest mean by 667), the mean stays
    within the clipping range. Such a round is aborted: the culprit cannot be named
    (that would need a proof per upload), but the model never takes the pushed mean."""
    updates, weights, start = random_updates(4, seed=33)
    cfg = secure_config(**({"dp.mode": "client"} if dp else {}))
    grid = InProcessGrid(updates, weights, cfg)
    grid.corrupt[("upload", list(updates)[1])] = _shift_masked(values, shift(weights))
    with pytest.raises(SecAggAbort, match=caught_by):
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


def test_one_bad_share_among_many_is_named_and_the_round_unmasks():
    """Each returned share is checked against the commitment its dealer gave, so one
    hospital returning wrong shares (at x = 1, where trying subsets in order once failed a
    round of 20 with 19 good shares) is named and skipped, and the round unmasks."""
    updates, weights, start = random_updates(20, seed=37)
    grid = InProcessGrid(updates, weights)
    first = min(updates)  # x = 1
    grid.corrupt[("unmask", first)] = _shares(lambda v: bytes(b ^ 0x5A for b in v))
    outcome = run_round(grid, start, secure_config())
    assert_mean_of(outcome, updates, weights, list(updates))
    assert [n for n in outcome.notes if f"node {first} returned a share" in n]


def test_a_dealer_whose_shares_rebuild_another_secret_is_named(monkeypatch):
    """A dealer can commit to shares that lie on no polynomial through its secret: every
    share then matches its commitment, and only the rebuilt secret's own check (seed hash,
    public key) tells. The round aborts naming the dealer, never using a wrong seed."""
    updates, _weights, start, grid, cfg, secure = federation(4, seed=36)
    dealer = str(list(updates)[2])
    honest_split, honest_share_keys = shamir.split, HospitalSecAgg.share_keys

    def shifted_split(secret, xs, threshold):
        shares = honest_split(secret, xs, threshold)
        return {
            x: ((int.from_bytes(y, "big") + 1) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
            for x, y in shares.items()
        }  # f + 1 at every x: consistent shares of secret + 1

    def share_keys(self, request, terms):
        if str(self.state["node"]) != dealer:
            return honest_share_keys(self, request, terms)
        monkeypatch.setattr(shamir, "split", shifted_split)
        try:
            return honest_share_keys(self, request, terms)
        finally:
            monkeypatch.setattr(shamir, "split", honest_split)

    monkeypatch.setattr(HospitalSecAgg, "share_keys", share_keys)
    with pytest.raises(SecAggAbort, match=f"node {dealer} dealt shares"):
        run_round(grid, start, cfg, secure)


def test_a_key_of_small_order_drops_its_sender_by_name():
    """An all-zero mask key makes every neighbour's derivation with it fail: once, every
    honest neighbour was dropped and named instead of the culprit. Keys are checked
    where they arrive."""
    updates, weights, start = random_updates(5, seed=38)
    nodes = list(updates)
    culprit = nodes[1]
    grid = InProcessGrid(updates, weights)
    grid.corrupt[("advertise", culprit)] = _set(Record.SECAGG, Key.S_PK, bytes(32))
    outcome = run_round(grid, start, secure_config())
    assert set(outcome.failed) == {culprit} and "small order" in outcome.failed[culprit]
    assert_mean_of(outcome, updates, weights, [n for n in nodes if n != culprit])


def test_no_secret_outlives_the_runs_last_round():
    """The last round plans no next one: no hospital keeps keys, seeds or shares after it."""
    updates, weights, start = random_updates(4, seed=39)
    cfg = secure_config(**{"num-server-rounds": 2})
    grid = InProcessGrid(updates, weights, cfg)
    secure = workflow(grid, cfg)
    run_round(grid, start, cfg, secure, server_round=1)
    assert secure.prepared is not None  # round 2 was prepared during round 1
    run_round(grid, start, cfg, secure, server_round=2)
    assert secure.prepared is None
    assert all(held == [] for held in secrets_held(grid).values())


def _both_survivor_and_dropped(message: Message) -> Message:
    content = RecordDict(dict(message.content.items()))
    config = dict(message.content[Record.CONFIG])
    config[Key.DROPPED] = [*config[Key.DROPPED], config[Key.SURVIVORS][0]]
    content[Record.CONFIG] = ConfigRecord(config)
    return Message(content=content, dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type)  # fmt: skip


@pytest.mark.parametrize("way_out", ["upload", "unmask"])
def test_every_way_out_of_a_round_deletes_its_secrets(way_out):
    """A hospital that refuses to mask (a NaN update) or to unmask (a request naming one
    hospital both survivor and dropped) keeps none of the round's secrets."""
    updates, weights, start = random_updates(4, seed=40)
    broken = next(iter(updates))
    grid = InProcessGrid(updates, weights)
    if way_out == "upload":
        updates[broken]["conv.bias"][0] = np.nan
    else:
        grid.alter[("unmask", broken)] = _both_survivor_and_dropped
    outcome = run_round(grid, start, secure_config())
    assert broken in outcome.failed
    assert secrets_held(grid)[broken] == []


@pytest.mark.parametrize("coordinator", ["honest", "deviating"])
def test_hospitals_given_different_run_configs_refuse_before_uploading(coordinator):
    """The SuperLink hands each node the run's config: a deviating coordinator could hand
    the victim another (a different learning rate, augmentation, clipping). An honest
    coordinator drops a hospital holding another config by name when it advertises; a
    deviating one that skips the check gains nothing: the run config's digest is part of
    every share ciphertext's authenticated data, so the victim and the others cannot
    open each other's shares, and none of them masks."""
    updates, _, start, grid, cfg, secure = federation(4, seed=41)
    victim = next(iter(updates))
    grid.use_config(cfg)
    other = secure_config(lr=0.3)  # only the learning rate differs
    grid.contexts[victim].run_config = other.to_mapping()
    if coordinator == "honest":
        outcome = secure.train_round(1, train_messages(list(updates), start, 1, cfg), SHAPES)
        assert set(outcome.failed) == {victim}
        assert "holds another run config" in outcome.failed[victim]
        return
    secure._advertised = lambda reply: public_keys(reply.content[Record.SECAGG])
    with pytest.raises(SecAggAbort, match="upload stage"):
        secure.train_round(1, train_messages(list(updates), start, 1, cfg), SHAPES)
    assert not [m for m in grid.seen if not m.has_error() and Record.ARRAYS in m.content]
    refusals = [m.error.reason for m in grid.seen if m.has_error()]
    assert len(refusals) == 4 and all("round terms" in r for r in refusals), refusals


class IsolatingCoordinator(SecureAggregation):
    """The real workflow up to the uploads; then it tells each hospital the view of the round
    of its choice (`views`: node -> (survivors, dropped)), runs the consistency step with
    those views, relays every tag (or, `reflect`, hands each hospital back the tags it
    produced itself), and tries to unmask the victim's upload alone."""

    victim: str
    views: dict[str, tuple[list[str], list[str]]]
    reflect = False

    def _unmask(self, prepared, summed, next_keys, result, terms) -> None:
        def view(node: str) -> RecordDict:
            survivors, dropped = self.views[node]
            return _content(1, {Key.SURVIVORS: survivors, Key.DROPPED: dropped})

        confirmed = self._exchange(Stage.CONFIRM, {n: view(n) for n in self.views}, result)
        self.refused_to_confirm = dict(result.failed)
        contents = {}
        for node in self.views:
            content = view(node)
            if self.reflect and node in confirmed:
                tags = dict(confirmed[node].content[Record.SECAGG])
            else:
                tags = {
                    Key.TAG_PREFIX + sender: reply.content[Record.SECAGG][Key.TAG_PREFIX + node]
                    for sender, reply in confirmed.items()
                    if Key.TAG_PREFIX + node in reply.content[Record.SECAGG]
                }
            content[Record.SECAGG] = ConfigRecord(tags)
            contents[node] = content
        answers = self._exchange(Stage.UNMASK, contents, result)
        self.refused_to_unmask = {
            n: why for n, why in result.failed.items() if why.startswith("unmask")
        }
        responses = {n: dict(r.content[Record.SECAGG]) for n, r in answers.items()}
        upload = next(r for r in result.replies if str(r.metadata.src_node_id) == self.victim)
        alone = MaskedSum(summed.template, summed.encoding, prepared.plan)
        weight = float(upload.content[Record.METRICS][Metric.WEIGHT])
        participants = len(prepared.plan.participants)
        alone.add(self.victim, upload.content[Record.ARRAYS][Key.MASKED_ARRAY].numpy(),
                  encoded_weight(weight, summed.encoding, participants))  # fmt: skip
        masked_with = [n for n in prepared.plan.participants if n != self.victim]
        dropped = [n for n in masked_with if n in self.isolate_from]
        alone.unmask(
            prepared.commitments(self.run_id),
            responses,
            dropped=dropped,
            purpose=mask_purpose(self.run_id, 1, terms),
        )


def _only_shares_from(keep: set[str]):
    """An upload request whose inbox holds only `keep`'s shares (and commitments)."""

    def alter(message: Message) -> Message:
        inbox = message.content[Record.SECAGG]
        for key in [k for k in inbox if k.split(".", 1)[1] not in keep]:
            del inbox[key]
        return message

    return alter


@pytest.mark.parametrize("views", ["one-view", "a-view-each", "a-view-each-tags-reflected"])
def test_choosing_whose_shares_reach_a_hospital_reveals_nothing(views):
    """The attack: the victim V's upload inbox holds only A's and B's shares, so V masks
    with them alone; declare A and B dropped, and V's upload is bare once its seed and A's
    and B's mask keys are rebuilt (cosine 1.0 before). Told one view ({V, C, D} survived),
    V refuses: survivors it did not mask with (Bonawitz et al.'s U3 within U2). Told a view
    each (V: {V, A, B} survived; C, D: A and B dropped; A: B dropped; B: A dropped), every
    hospital asked for a dropped neighbour's key share first needs threshold - 1 neighbours
    to have tagged the same view, and each hospital tags one view only: A's and B's keys
    never come back, V's seed alone is useless. Handing each hospital back its own tags as
    its neighbours' agreement (a pair shares one key) passed the check and rebuilt V's
    update at cosine 1.0 before tags carried their direction (attack round 2)."""
    updates, weights, start = random_updates(5, seed=42, spread=0.01)
    cfg = secure_config()
    grid = InProcessGrid(updates, weights, cfg)
    v, a, b, c, d = (str(n) for n in updates)
    grid.alter[("upload", int(v))] = _only_shares_from({a, b})
    attacker = IsolatingCoordinator(ReplyCollector(Exchange(grid, 0.2), SiteNames()), cfg, RUN_ID)
    attacker.victim, attacker.isolate_from = v, {a, b}
    attacker.reflect = views.endswith("reflected")
    if views == "one-view":
        one = ([v, c, d], [a, b])
        grid.drop["upload"] = {int(a), int(b)}
        attacker.views = {v: one, c: one, d: one}
    else:
        attacker.views = {
            v: ([v, a, b], [c, d]),
            c: ([v, c, d], [a, b]),
            d: ([v, c, d], [a, b]),
            a: ([v, a, c, d], [b]),
            b: ([v, b, c, d], [a]),
        }
    messages = train_messages(grid.get_node_ids(), global_model(start, 1), 1, cfg)
    with pytest.raises(SecAggAbort, match="checked shares of node"):
        attacker.train_round(1, messages, SHAPES)
    if views == "one-view":
        assert "did not mask with" in attacker.refused_to_confirm[int(v)]
        assert "confirmed the same view" in attacker.refused_to_unmask[int(c)]
    else:
        # V holds no share of a neighbour it is told dropped: it hands out seed shares only
        assert set(attacker.refused_to_unmask) == {int(n) for n in (a, b, c, d)}
        assert all("confirmed the same view" in why for why in attacker.refused_to_unmask.values())


def _deployed_nodes(grid: InProcessGrid, folder) -> None:
    """Give each hospital a cache folder, as `medfed node start` does: its ledgers persist."""
    for node, context in grid.contexts.items():
        context.node_config[NodeConfig.CACHE_DIR] = str(folder / str(node))


def _new_run(grid: InProcessGrid, run_id: int) -> None:
    """The same hospitals in another Flower run (a resume, or a fresh `flwr run`)."""
    for context in grid.contexts.values():
        context.run_id, context.state = run_id, RecordDict()


@pytest.mark.parametrize(
    ("unmasked", "resent"),
    [(True, "as-sent"), (True, "as-float64-reordered"), (False, "as-sent")],
    ids=["unmasked", "unmasked-resent-as-float64", "never-unmasked"],
)
def test_a_sum_over_one_model_is_revealed_once_across_runs(tmp_path, unmasked, resent):
    """The attack: round 1 on model M in run 7 with {V, A, B, C}, then round 1 on M in run 8
    with {A, B, C}: the run ledgers are per run, training repeats bit for bit, and the
    difference of the sums was V's update (cosine 1.0). A hospital that helped unmask a sum
    over M refuses a secure round on M in any later run; one whose round never unmasked
    (the run died first) may train it again, so a run can be carried on. The same model
    sent as float64, arrays reordered, loads into the network as the same weights: it is the
    same model (it passed for a new one while the ledger hashed bytes as sent; attack
    round 2)."""
    updates, _weights, start, grid, cfg, secure = federation(4, seed=43)
    _deployed_nodes(grid, tmp_path)
    nodes = list(updates)
    if not unmasked:
        grid.drop["unmask"] = set(nodes)
    try:
        run_round(grid, start, cfg, secure)
    except SecAggAbort:
        assert not unmasked
    _new_run(grid, 8)
    grid.drop = {}
    again = workflow(grid, cfg, run_id=8)
    model = global_model(start, 1)
    if resent == "as-float64-reordered":
        model = {k: v.astype(np.float64) for k, v in reversed(list(model.items()))}
    messages = train_messages(nodes[1:], model, 1, cfg)
    if not unmasked:
        assert len(again.train_round(1, messages, SHAPES).replies) == 3
        return
    with pytest.raises(SecAggAbort, match="upload stage"):
        again.train_round(1, messages, SHAPES)
    reasons = [m.error.reason for m in grid.seen if m.has_error()]
    assert sum("already helped reveal a sum over this global model" in r for r in reasons) == 3


def test_a_hospitals_own_epsilon_composes_across_runs(tmp_path):
    """Its own epsilon against the coordinator counts every noisy update it ever sent,
    not only this run's: the same data released again is a release again."""
    from medfed.client.privacy.hospital_noise import own_epsilon
    from tests.server.secagg.test_hospital_noise import hospitals

    _nodes, _, start, cfg, grid = hospitals(3, seed=54)
    _deployed_nodes(grid, tmp_path)
    first = run_round(grid, start, cfg)
    _new_run(grid, 9)
    second = run_round(grid, start, cfg, workflow(grid, cfg, run_id=9), server_round=2)
    spent = [
        [r.content[Record.METRICS][Metric.DP_EPSILON_OWN] for r in outcome.replies]
        for outcome in (first, second)
    ]
    multiplier = cfg.dp_noise_multiplier / 3**0.5
    assert spent[0] == pytest.approx([own_epsilon([multiplier], cfg.dp_delta)] * 3)
    assert spent[1] == pytest.approx([own_epsilon([multiplier] * 2, cfg.dp_delta)] * 3)
