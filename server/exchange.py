"""One exchange with the hospitals: send, wait with a bound, sort the replies, check updates.

Flower's `Grid.send_and_receive` sleeps a fixed interval between pulls (3 s
on a deployed SuperLink) and its strategies drop failed replies silently. A
consortium needs the opposite: every reply is sorted into a usable one or a
failure named by site with its reason, and every model update is checked
before anything aggregates it. The checks live here, for plain replies, for
masked uploads and for the unmasked aggregate of a secure round alike.
Model arrays travel packed into one array each way (shared_models/flat_arrays.py):
callers send and receive named arrays.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from medfed.shared_models import protocol
from medfed.shared_models.arrays import readable
from medfed.shared_models.flat_arrays import LayoutError, pack_content, unpack_content
from medfed.shared_models.flower_pin import shorten_object_pulls
from medfed.shared_models.protocol import SITE_NAME, Key, Metric, Record, SiteKey
from medfed.shared_models.secagg import shamir
from medfed.shared_models.secagg.primitives import InvalidPublicKey, check_public_key
from medfed.shared_models.weights import incompatibilities, record_template

if TYPE_CHECKING:
    from medfed.server.secure_aggregation import SecureStats

# Pull replies again after 5 % of the time waited so far (5 ms at least, 0.5 s at
# most): a reply is picked up at most 5 % late, with few pulls on long rounds.
FIRST_POLL, LONGEST_POLL, POLL_FRACTION = 0.005, 0.5, 0.05


class QuorumError(RuntimeError):
    """Too few hospitals connected or replied; the message says how many and who."""


class MalformedReply(ValueError):
    """A reply that cannot be used as it is: its hospital is dropped, never the run."""


@dataclass(frozen=True)
class Answer:
    """One reply, the node it answers for and how long after sending it arrived.

    The node is the destination of the message replied to, not the reply's
    sender: when a node dies, the SuperLink itself answers for it ("Node
    Unavailable") with its own id as the sender.
    """

    reply: Message
    node: int
    seconds: float


@dataclass(frozen=True)
class Delivery:
    """Everything that came back from one push, and how long the wait lasted."""

    answers: list[Answer]
    waited: float
    sent_at: float  # Unix time of the push: the nodes' logs share this clock


@dataclass(frozen=True)
class ExchangeTiming:
    """When one exchange went out and how long each hospital's answer took to be seen.

    A deployed round's time goes mostly to waits no single process sees: the
    SuperNode picking the message up, a fresh ClientApp process, the reply
    travelling back. Recording the push time and each arrival per round
    (metrics.json `exchanges`) lets an operator tell a slow hospital from a
    slow round, and the round-latency benchmark line the nodes' logs up with it.
    """

    message: str  # the message type sent
    sent_at: float  # Unix time of the push
    waited: float  # seconds until the last reply arrived or the timeout
    answered: dict[int, float]  # node -> seconds from the push until its reply was pulled

    @classmethod
    def of(cls, messages: list[Message], delivery: Delivery) -> ExchangeTiming:
        """The timing of `delivery`, the answers to `messages`."""
        kinds = sorted({m.metadata.message_type for m in messages})
        return cls(
            message=",".join(kinds),
            sent_at=delivery.sent_at,
            waited=delivery.waited,
            answered={answer.node: answer.seconds for answer in delivery.answers},
        )

    def to_json(self, names: SiteNames) -> dict[str, object]:
        """The entry in a round's `exchanges`, hospitals by site name."""
        replies = {names(node): round(seconds, 3) for node, seconds in self.answered.items()}
        return {
            "message": self.message,
            "sent-at": round(self.sent_at, 3),
            "seconds": round(self.waited, 3),
            "replies": dict(sorted(replies.items())),
        }


# Flower's deployed grid pulls a reply's objects in this method (`pull_objects`).
REPLY_PULLERS = {
    "HttpGrid.pull_messages": "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83"
}


def quicken_reply_pulls(grid: Grid) -> None:
    """The coordinator asks for a reply as soon as the SuperLink lists it, while the
    hospital's SuperNode is still uploading its objects: retry after 0.1 s, not
    Flower's 1 s (shared_models/flower_pin.py). Only the deployed grid pulls objects."""
    from flwr.superlink.grid import http_grid

    if isinstance(grid, http_grid.HttpGrid):
        shorten_object_pulls(http_grid, "pull_objects", REPLY_PULLERS)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> Delivery:
    """Push `messages`, then pull replies until all arrived or `timeout` seconds passed.

    Waits `poll_pause` between pulls: a few cheap pulls for the SuperLink,
    almost no idle time for the round.
    """
    messages = list(messages)
    sent_at, started = time.time(), time.monotonic()
    ids = list(grid.push_messages(messages))
    destination = {
        message_id: message.metadata.dst_node_id
        for message_id, message in zip(ids, messages, strict=False)
        if message_id
    }
    waiting = set(destination)
    deadline = started + timeout
    answers: list[Answer] = []
    while waiting:
        got = [r for r in grid.pull_messages(waiting) if r.metadata.reply_to_message_id in waiting]
        arrived = time.monotonic() - started
        for reply in got:
            answers.append(Answer(reply, destination[reply.metadata.reply_to_message_id], arrived))
        waiting -= {reply.metadata.reply_to_message_id for reply in got}
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(poll_pause(time.monotonic() - started), left))
    return Delivery(answers, time.monotonic() - started, sent_at)


def poll_pause(waited: float) -> float:
    """Seconds to wait before the next pull, after `waited` seconds of waiting.

    In proportion to the wait, so a reply is picked up at most POLL_FRACTION late
    (a geometric back-off, x1.5 from 5 ms, notices a reply arriving 0.9 s into an
    exchange only at 1.3 s).
    """
    return min(max(FIRST_POLL, POLL_FRACTION * waited), LONGEST_POLL)


# How Flower's ClientApp runner words an exception it turns into an error reply.
FLOWER_EXCEPTION = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def short_reason(reason: str) -> str:
    """The exception a hospital's node raised, in one line: `Name: message`."""
    unwrapped = FLOWER_EXCEPTION.sub(r"\1: \2", reason.strip())
    lines = [line.strip() for line in unwrapped.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:400]


def error_reason(answer: Answer) -> str:
    """Why an error reply's hospital is lost: its node is gone, or it raised an error."""
    error = answer.reply.error
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return (
            "node unavailable: its heartbeats stopped "
            f"(the coordinator gave up on it {answer.seconds:.3g}s after sending)"
        )
    return f"error: {short_reason(error.reason)}"


def unpack_reply(reply: Message) -> None:
    """Unpack a reply's arrays in place; one whose packing is malformed becomes an error
    reply naming the problem (its hospital is then lost for the step, like any error)."""
    if not reply.has_content():
        return
    try:
        reply.content = unpack_content(reply.content)
    except LayoutError as error:
        reply.__dict__["_content"] = None  # Flower lets a message hold content or an error
        reply.error = Error(protocol.ErrorCode.MALFORMED_REPLY, f"malformed packed arrays: {error}")


def array_bytes(messages: Iterable[Message]) -> int:
    """Bytes of model arrays in the messages (error replies carry none)."""
    return sum(
        len(array.data)
        for message in messages
        if not message.has_error()
        for record in message.content.array_records.values()
        for array in record.values()
    )


def update_problems(arrays: ArrayRecord | None, sent: ArrayRecord) -> list[str]:
    """Why `arrays` cannot be averaged into the arrays `sent` (empty if they can).

    Names, shapes, float dtypes and finite values: one broken or rogue
    hospital must not poison the global model.
    """
    if arrays is None:
        return [f"no '{Record.ARRAYS}' record"]
    return incompatibilities(arrays, record_template(sent))


def metrics_problems(reply: Message, weighted: bool = True) -> list[str]:
    """Why a reply's metrics cannot be aggregated (empty if they can): a missing record,
    a value that is not a finite number (or a list of them), a weight that is not > 0."""
    metrics = reply.content.metric_records.get(Record.METRICS)
    if metrics is None:
        return [f"no '{Record.METRICS}' record"]
    problems = []
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            problems.append(f"metric '{key}' is not a finite number")
    if weighted:
        weight = metrics.get(Metric.WEIGHT)
        if not (_finite_number(weight) and weight > 0):
            problems.append(f"'{Metric.WEIGHT}' is {str(weight)[:40]}, not a positive number")
    return problems


def _finite_number(value: object) -> bool:
    """A finite float, or an int within int64: what the wire carries and NumPy averages
    (Flower takes an int of any size in process, where np.isfinite raises on it)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def update_norm(arrays: ArrayRecord, sent: Mapping[str, np.ndarray]) -> float:
    """How far an update moves the model: the L2 norm of (update - sent). Each array's
    squared norm is summed in float64; within an array the BLAS dot accumulates in the
    arrays' own precision, enough for a threshold of several times the median."""
    total = 0.0
    for name, start in sent.items():
        values = readable(arrays[name])  # a view of the reply's bytes, checked before
        change = np.subtract(values, start).ravel()
        total += float(np.dot(change, change))
    return float(np.sqrt(total))


def reject_outsized_updates(
    result: RoundReplies, sent: ArrayRecord, factor: float, names: SiteNames
) -> None:
    """Move to the failures every update that changes the model more than `factor` times the
    cohort's median change (config key 'update-norm-factor').

    A scaled or boosted update (model replacement) passes every per-update
    check; against the median of at least three it stands out. With fewer,
    a median says nothing, and the robust strategies are the defence.
    """
    if len(result.ok) < 3:
        result.notes.append(
            f"update-norm check skipped: {len(result.ok)} usable update(s), it needs 3 to compare"
        )
        return
    start = {name: readable(array) for name, array in sent.items()}  # views, no copies
    norms = {id(r): update_norm(r.content[Record.ARRAYS], start) for r in result.ok}
    median = float(np.median(list(norms.values())))
    if median == 0:  # half the cohort sent the model back unchanged: nothing to scale by
        result.notes.append("update-norm check skipped: the median update changes nothing")
        return
    limit = factor * median
    for reply in [r for r in result.ok if norms[id(r)] > limit]:
        result.ok.remove(reply)
        result.failed[names(reply.metadata.src_node_id)] = (
            f"rejected update: it changes the model by {norms[id(reply)]:.3g}, more than "
            f"{factor:g} x the median change {limit / factor:.3g} "
            "(config key 'update-norm-factor')"
        )


def keep_consistent_metrics(result: RoundReplies, names: SiteNames) -> None:
    """Flower aggregates metrics only over replies with identical keys: replies whose keys
    differ from the most common set are moved to the failures, by site."""
    key_sets = Counter(frozenset(r.content[Record.METRICS]) for r in result.ok)
    if len(key_sets) < 2:
        return
    usual = key_sets.most_common(1)[0][0]
    for reply in [r for r in result.ok if frozenset(r.content[Record.METRICS]) != usual]:
        result.ok.remove(reply)
        result.failed[names(reply.metadata.src_node_id)] = (
            "rejected reply: its metrics differ from the other hospitals'"
        )


def validation_replies(trained: RoundReplies, names: SiteNames) -> RoundReplies:
    """The validation of the received model each training reply carries (run config
    `separate-evaluation = false`), as evaluation replies: the same checks, the same
    shape (a view of the reply whose metrics are its validation), failures by site. It is
    taken out of the training replies (a strategy aggregates one metric record)."""
    result = RoundReplies(sampled=trained.sampled)
    for reply in trained.ok:
        site = names(reply.metadata.src_node_id)
        validation = reply.content.metric_records.get(Record.VALIDATION)
        if validation is not None:
            del reply.content[Record.VALIDATION]
        if validation is None:
            result.failed[site] = f"rejected validation: no '{Record.VALIDATION}' record"
            continue
        view = copy.copy(reply)  # Flower's Message has no copy of its own: a shallow one
        view.__dict__["_content"] = RecordDict(
            {Record.METRICS: validation, Record.SITE: reply.content[Record.SITE]}
        )
        problems = metrics_problems(view)
        if problems:
            result.failed[site] = "rejected validation: " + "; ".join(problems[:3])
            continue
        result.ok.append(view)
    keep_consistent_metrics(result, names)
    return result


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


UNNAMED = "node-"  # a hospital's label until it names itself in a reply


def described(site: str) -> str:
    """A site label as a person reads it: a node that never replied has no name yet."""
    if site.startswith(UNNAMED):
        return f"a hospital not yet named (node {site[len(UNNAMED) :]}, it never replied)"
    return site


class SiteNames:
    """Hospitals' site names by node id, learnt from the `site` record of their replies."""

    def __init__(self) -> None:
        self.by_node: dict[int, str] = {}

    def problem(self, reply: Message) -> str | None:
        """Why the site name a reply carries cannot be taken (None when it can).

        A name is a short label; one node keeps one name, and no node may take
        another's (its failures would be filed under the other hospital).
        """
        if Record.SITE not in reply.content.config_records:
            return None
        name = reply.content.config_records[Record.SITE].get(SiteKey.NAME)
        if not (isinstance(name, str) and SITE_NAME.fullmatch(name)):
            return f"site name {str(name)[:40]!r} is not a short label"
        node = reply.metadata.src_node_id
        known = self.by_node.get(node)
        if known is not None and known != name:
            return f"site name {name!r} differs from the {known!r} it gave before"
        if known is None and name in self.by_node.values():
            return f"site name {name!r} is already another node's"
        return None

    def learn(self, reply: Message) -> None:
        """Note the site name a reply carries (checked with `problem` first)."""
        if Record.SITE in reply.content.config_records:
            site = reply.content.config_records[Record.SITE]
            self.by_node[reply.metadata.src_node_id] = str(site[SiteKey.NAME])

    def __call__(self, node: int) -> str:
        return self.by_node.get(node, f"{UNNAMED}{node}")

    def in_text(self, text: str) -> str:
        """`text` with every 'node <id>' of a known hospital replaced by its site name."""
        for node, site in self.by_node.items():
            text = text.replace(f"node {node}", site)
        return text


@dataclass
class RoundReplies:
    """One exchange's replies: usable ones, failures by site, and how many were asked."""

    ok: list[Message] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # site -> reason
    sampled: int = 0
    secure: SecureStats | None = None  # how a secure round went
    notes: list[str] = field(default_factory=list)  # checks that could not run, and why


class Exchange:
    """Sends one kind of message to the sampled hospitals and sorts what comes back."""

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        names: SiteNames,
        on_traffic: Callable[[int, int], None] = lambda sent, received: None,
        norm_factor: float = 0.0,
    ) -> None:
        self.grid, self.timeout, self.names = grid, timeout, names
        quicken_reply_pulls(grid)
        self.on_traffic = on_traffic
        self.norm_factor = norm_factor
        self.timings: list[ExchangeTiming] = []  # since the round loop last cleared them

    def send(self, messages: list[Message]) -> Delivery:
        """All replies that arrived within the timeout, errors included; arrays packed on
        the wire, named arrays in and out."""
        originals = [message.content for message in messages]
        packed: dict[int, RecordDict] = {}
        for message in messages:  # messages often share one content: packed once
            if id(message.content) not in packed:
                packed[id(message.content)] = pack_content(message.content)
            message.content = packed[id(message.content)]
        try:
            delivery = send_and_receive(self.grid, messages, self.timeout)
        finally:
            for message, content in zip(messages, originals, strict=True):
                message.content = content
        for answer in delivery.answers:
            unpack_reply(answer.reply)
        self.on_traffic(array_bytes(messages), array_bytes(a.reply for a in delivery.answers))
        self.timings.append(ExchangeTiming.of(messages, delivery))
        return delivery

    def collect(
        self, messages: Iterable[Message], sent: ArrayRecord | None = None, weighted: bool = True
    ) -> RoundReplies:
        """Usable replies and failures by site; with `sent`, updates must fit those arrays.

        `weighted`: the replies' metrics are averaged by their aggregation weight.
        """
        messages = list(messages)
        result = RoundReplies(sampled=len({m.metadata.dst_node_id for m in messages}))
        delivery = self.send(messages)
        for answer in delivery.answers:
            reply, site = answer.reply, self.names(answer.node)
            if reply.has_error():
                result.failed[site] = error_reason(answer)
                continue
            problem = self.names.problem(reply)
            if problem:
                result.failed[site] = f"rejected reply: {problem}"
                continue
            self.names.learn(reply)
            site = self.names(answer.node)
            arrays = reply.content.array_records.get(Record.ARRAYS)
            problems = update_problems(arrays, sent) if sent is not None else []
            if problems:
                result.failed[site] = "rejected update: " + "; ".join(problems[:3])
                continue
            problems = metrics_problems(reply, weighted)
            if problems:
                result.failed[site] = "rejected reply: " + "; ".join(problems[:3])
                continue
            result.ok.append(reply)
        answered = {answer.node for answer in delivery.answers}
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                result.failed[self.names(message.metadata.dst_node_id)] = self.silence(
                    delivery.waited
                )
        if sent is not None and self.norm_factor:
            reject_outsized_updates(result, sent, self.norm_factor, self.names)
        keep_consistent_metrics(result, self.names)
        # Replies arrive in any order; aggregating them by site makes a float sum, and so a
        # seeded run, reproducible.
        result.ok.sort(key=lambda reply: self.names(reply.metadata.src_node_id))
        return result

    def silence(self, waited: float) -> str:
        """The failure reason of a hospital that did not answer in time."""
        return f"timed out: no reply after {waited:.0f}s (config key 'round-timeout-seconds')"
