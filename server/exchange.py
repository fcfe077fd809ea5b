"""One exchange with the hospitals: send, wait with a bound, sort the replies, check updates.

Flower's `Grid.send_and_receive` sleeps a fixed interval between pulls (3 s
on a deployed SuperLink) and its strategies drop failed replies silently. A
consortium needs the opposite: every reply is sorted into a usable one or a
failure named by site with its reason, and every model update is checked
before anything aggregates it. The checks live here, for plain replies, for
masked uploads and for the unmasked aggregate of a secure round alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from medfed.shared_models.protocol import Key, Record, SiteKey
from medfed.shared_models.weights import incompatibilities, record_template

if TYPE_CHECKING:
    from medfed.server.secure_aggregation import SecureStats

FIRST_POLL, LONGEST_POLL = 0.005, 0.5


class QuorumError(RuntimeError):
    """Too few hospitals connected or replied; the message says how many and who."""


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push `messages`, then pull replies until all arrived or `timeout` seconds passed.

    Polls after 5 ms and backs off to at most 0.5 s: a few cheap pulls for
    the SuperLink, almost no idle time for the round.
    """
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    pause = FIRST_POLL
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {reply.metadata.reply_to_message_id for reply in got}
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, LONGEST_POLL)
    return replies


def short_reason(reason: str) -> str:
    """The last line of a remote traceback: the exception a hospital's node raised."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


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


def masked_upload_problems(arrays: ArrayRecord | None, size: int) -> list[str]:
    """Why a secure round's upload cannot be added to the masked sum (empty if it can)."""
    if arrays is None or list(arrays) != [Key.MASKED_ARRAY]:
        return [f"expected one '{Key.MASKED_ARRAY}' array"]
    masked = arrays[Key.MASKED_ARRAY].numpy()
    if masked.dtype != np.uint32 or masked.shape != (size,):
        return [f"masked update is {masked.dtype}{masked.shape}, expected uint32({size},)"]
    return []


class SiteNames:
    """Hospitals' site names by node id, learnt from the `site` record of their replies."""

    def __init__(self) -> None:
        self.by_node: dict[int, str] = {}

    def learn(self, reply: Message) -> None:
        """Note the site name a reply carries."""
        if Record.SITE in reply.content.config_records:
            site = reply.content.config_records[Record.SITE]
            self.by_node[reply.metadata.src_node_id] = str(site[SiteKey.NAME])

    def __call__(self, node: int) -> str:
        return self.by_node.get(node, f"node-{node}")

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


class Exchange:
    """Sends one kind of message to the sampled hospitals and sorts what comes back."""

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        names: SiteNames,
        on_traffic: Callable[[int, int], None] = lambda sent, received: None,
    ) -> None:
        self.grid, self.timeout, self.names = grid, timeout, names
        self.on_traffic = on_traffic

    def send(self, messages: list[Message]) -> list[Message]:
        """All replies that arrived within the timeout, errors included."""
        replies = send_and_receive(self.grid, messages, self.timeout)
        self.on_traffic(array_bytes(messages), array_bytes(replies))
        return replies

    def collect(self, messages: Iterable[Message], sent: ArrayRecord | None = None) -> RoundReplies:
        """Usable replies and failures by site; with `sent`, updates must fit those arrays."""
        messages = list(messages)
        result = RoundReplies(sampled=len({m.metadata.dst_node_id for m in messages}))
        answered = set()
        for reply in self.send(messages):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                result.failed[self.names(node)] = f"error: {short_reason(reply.error.reason)}"
                continue
            self.names.learn(reply)
            arrays = reply.content.array_records.get(Record.ARRAYS)
            problems = update_problems(arrays, sent) if sent is not None else []
            if problems:
                result.failed[self.names(node)] = "rejected update: " + "; ".join(problems[:3])
                continue
            result.ok.append(reply)
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                result.failed[self.names(message.metadata.dst_node_id)] = self.silence()
        # Replies arrive in any order; aggregating them by site makes a float sum, and so a
        # seeded run, reproducible.
        result.ok.sort(key=lambda reply: self.names(reply.metadata.src_node_id))
        return result

    def silence(self) -> str:
        """The failure reason of a hospital that did not answer in time."""
        return f"no reply within {self.timeout:.0f}s (config key 'round-timeout-seconds')"
