"""One exchange with the hospitals, as transport: send, wait with a bound, bring replies back.

Flower's `Grid.send_and_receive` sleeps a fixed interval between pulls (3 s
on a deployed SuperLink); here a pull follows a reply within 5 % of the time
waited. Model arrays travel packed into one array each way
(shared_models/flat_arrays.py): callers send and receive named arrays. What a
reply is worth is decided elsewhere: server/run/replies.py for every reply,
server/secagg/stage_replies.py for the records of the SecAgg+ stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid

from medfed.shared_models import protocol
from medfed.shared_models.flat_arrays import LayoutError, pack_content, unpack_content
from medfed.shared_models.flower_pin import shorten_object_pulls

# Pull replies again after 5 % of the time waited so far (5 ms at least, 0.5 s at
# most): a reply is picked up at most 5 % late, with few pulls on long rounds.
FIRST_POLL, LONGEST_POLL, POLL_FRACTION = 0.005, 0.5, 0.05


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

    def to_json(self, names: Callable[[int], str]) -> dict[str, object]:
        """The entry in a round's `exchanges`, hospitals by site name (`names`: node -> site)."""
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


class Exchange:
    """Sends messages to hospitals and brings back what they answer within the timeout."""

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        on_traffic: Callable[[int, int], None] = lambda sent, received: None,
    ) -> None:
        self.grid, self.timeout = grid, timeout
        quicken_reply_pulls(grid)
        self.on_traffic = on_traffic
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
