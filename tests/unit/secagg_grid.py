"""An in-process Grid that delivers SecAgg+ messages to real client-side handlers.

It lets the tests drive the coordinator's actual round code against the
hospitals' actual protocol code with chosen updates, chosen dropouts and a
record of everything the coordinator receives.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from medfed.client import secure_stage
from medfed.shared_models.config import RunConfig

RUN_ID = 7


class SecAggGrid:
    """Nodes with fixed updates and weights; `drop[stage]` nodes never answer that stage."""

    def __init__(self, updates: dict[int, dict[str, np.ndarray]], weights: dict[int, float]):
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = 1  # the coordinator's id in Flower
        TaskIdentity.task_id = 1
        self.updates, self.weights = updates, weights
        self.contexts = {node: Context(RUN_ID, node, {}, RecordDict(), {}) for node in updates}
        self.drop: dict[str, set[int]] = {}
        self.seen: list[Message] = []  # every reply the coordinator received
        self.outbox: list[Message] = []
        self.secrets: dict[int, list[bytes]] = {node: [] for node in updates}
        self.tamper: set[tuple[int, int]] = set()  # (receiver, sender) ciphertexts to corrupt

    def get_node_ids(self) -> Iterable[int]:
        return list(self.updates)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Handle each message at once; its reply waits to be pulled (ids as Flower sets them)."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            stage = message.metadata.message_type.removeprefix("train.secagg_")
            if node in self.drop.get("upload" if stage == "train" else stage, set()):
                continue
            try:
                reply = self._handle(stage, message, node)
            except Exception as err:  # Flower turns any ClientApp exception into an error reply
                reply = Message(
                    error=Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message
                )
            self.outbox.append(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [m for m in self.outbox if m.metadata.reply_to_message_id in wanted]
        self.outbox = [m for m in self.outbox if m not in ready]
        self.seen += ready
        return ready

    def _handle(self, stage: str, message: Message, node: int) -> Message:
        context = self.contexts[node]
        if stage == "advertise":
            reply = secure_stage.advertise(message, context, self.weights[node])
            state = context.state.config_records[secure_stage.STATE_KEY]
            self.secrets[node] += [state["c-sk"], state["s-sk"]]
            return reply
        if stage == "share":
            reply = secure_stage.share(message, context)
            self.secrets[node].append(context.state.config_records[secure_stage.STATE_KEY]["seed"])
            return reply
        if stage == "train":
            inbox = message.content["secagg"]
            for receiver, sender in self.tamper:
                key = f"from.{sender}"
                if receiver == node and key in inbox:
                    corrupted = bytearray(inbox[key])
                    corrupted[-1] ^= 1
                    inbox[key] = bytes(corrupted)
            start = {k: a.numpy() for k, a in message.content["arrays"].items()}
            trained = {k: start[k] + self.updates[node][k] for k in start}
            masked, clipped, ahead = secure_stage.masked_update(
                message, context, start, trained, self.weights[node]
            )
            upcoming = context.state.config_records[secure_stage.NEXT_KEY]
            self.secrets[node] += [upcoming["c-sk"], upcoming["s-sk"]]
            metrics = MetricRecord(
                {
                    "train-loss": 1.0,
                    "num-examples": 10,
                    "aggregation-weight": self.weights[node],
                    "secagg-clipped-values": clipped,
                }
            )
            content = RecordDict({"arrays": masked, "metrics": metrics, "secagg": ahead})
            return Message(content=content, reply_to=message)
        reply = secure_stage.unmask(message, context)
        if secure_stage.STATE_KEY in context.state.config_records:  # next round prepared
            self.secrets[node].append(context.state.config_records[secure_stage.STATE_KEY]["seed"])
        return reply


def train_messages(nodes: Iterable[int], start: dict[str, np.ndarray], server_round: int = 1):
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    # One content object for all, as Flower's FedAvg.configure_train builds them.
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return [
        Message(
            content=content,
            dst_node_id=node,
            message_type="train",
        )
        for node in nodes
    ]


def secure_config(**overrides) -> RunConfig:
    values = {"secure-aggregation": True, "min-nodes": 2, "round-timeout-seconds": 0.2}
    values.update(overrides)
    return RunConfig.from_mapping(values)
