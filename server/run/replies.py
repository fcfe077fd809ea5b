"""What each hospital's reply is worth: usable, or a failure named by site with its reason.

Flower's strategies drop failed replies silently. A consortium needs the
opposite: every reply of an exchange (server/run/exchange.py) is sorted into
a usable one or a failure filed under the hospital's site name, and every
model update is checked before anything aggregates it: names, shapes,
dtypes, finite values, metrics Flower can average, an update no larger than
the cohort allows. The SecAgg+ workflow applies the same checks to its
unmasked aggregate (server/secagg/workflow.py).
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from medfed.server.run.exchange import Answer, Exchange
from medfed.shared_models.arrays import readable
from medfed.shared_models.protocol import SITE_NAME, Metric, Record, SiteKey
from medfed.shared_models.weights import incompatibilities, record_template

if TYPE_CHECKING:
    from medfed.server.secagg.stats import SecureStats


class QuorumError(RuntimeError):
    """Too few hospitals connected or replied; the message says how many and who."""


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


class ReplyCollector:
    """Sends one kind of message through the exchange and sorts what comes back by site."""

    def __init__(self, exchange: Exchange, names: SiteNames, norm_factor: float = 0.0) -> None:
        self.exchange, self.names, self.norm_factor = exchange, names, norm_factor

    def collect(
        self, messages: Iterable[Message], sent: ArrayRecord | None = None, weighted: bool = True
    ) -> RoundReplies:
        """Usable replies and failures by site; with `sent`, updates must fit those arrays.

        `weighted`: the replies' metrics are averaged by their aggregation weight.
        """
        messages = list(messages)
        result = RoundReplies(sampled=len({m.metadata.dst_node_id for m in messages}))
        delivery = self.exchange.send(messages)
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
