"""The ClientApp side of a secure round: messages in, SecAgg+ steps, messages out.

The protocol state of the round sits in the node's `context.state`, which
stays on the hospital's machine (Flower keeps it in the SuperNode), and is
deleted after the unmask step so no secret outlives its round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medfed.client.secagg import SecAggClient, SecAggRefused
from medfed.shared_models.secagg.vector import flatten

STATE_KEY = "medfed-secagg"


def _client(context: Context) -> SecAggClient:
    if STATE_KEY not in context.state.config_records:
        raise SecAggRefused("no secure-aggregation state on this node for the round")
    return SecAggClient(context.state.config_records[STATE_KEY])


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def _start(context: Context, server_round: int) -> dict[str, bytes]:
    client, public = SecAggClient.start(context.run_id, server_round, str(context.node_id))
    context.state[STATE_KEY] = client.state
    return public


def advertise(msg: Message, context: Context, weight: float) -> Message:
    """Fresh key pairs for the round; the public halves and the aggregation weight go back."""
    public = _start(context, _round(msg))
    content = RecordDict(
        {
            "secagg": ConfigRecord(public),
            "metrics": MetricRecord({"aggregation-weight": weight}),
        }
    )
    return Message(content=content, reply_to=msg)


def share(msg: Message, context: Context) -> Message:
    """Encrypted shares of this hospital's secrets, one per neighbour."""
    config = msg.content["config"]
    secagg = msg.content["secagg"]
    xs = {key[2:]: int(value) for key, value in secagg.items() if key.startswith("x.")}
    neighbours = {
        key[5:]: (secagg[key], secagg[f"s-pk.{key[5:]}"])
        for key in secagg
        if key.startswith("c-pk.")
    }
    client = _client(context)
    sealed = client.share_keys(
        _round(msg),
        xs,
        neighbours,
        int(config["threshold"]),
        float(config["fraction"]),
        float(config["clipping-range"]),
        int(config["quantization-bits"]),
    )
    client.state["weight"] = float(config["weight"])  # what the coordinator weighs us by
    content = RecordDict({"secagg": ConfigRecord({f"to.{n}": c for n, c in sealed.items()})})
    return Message(content=content, reply_to=msg)


MASKED_KEY = "masked"


def masked_update(
    msg: Message,
    context: Context,
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    weight: float,
) -> tuple[ArrayRecord, int]:
    """The masked encoding of (trained - start) as one flat uint32 array, and the
    count of clipped values. `start` holds the received global arrays, in order;
    `weight` is this hospital's aggregation weight now."""
    client = _client(context)
    if float(client.state["weight"]) != weight:
        raise SecAggRefused(
            f"the coordinator weighs this hospital by {client.state['weight']:g}, but its "
            f"aggregation weight is now {weight:g} (site data changed); it rejoins next round"
        )
    inbox = msg.content["secagg"]
    client.receive_shares(
        _round(msg), {key[5:]: value for key, value in inbox.items() if key.startswith("from.")}
    )
    keys = list(start)
    update = flatten(trained, keys)
    update -= flatten(start, keys)
    try:
        masked, clipped = client.mask(_round(msg), update)
    except ValueError as err:
        raise ValueError(f"this hospital's update cannot be sent: {err}") from err
    return ArrayRecord({MASKED_KEY: Array(masked)}), clipped


def unmask(msg: Message, context: Context) -> Message:
    """One share per neighbour as the round's outcome requires, then forget the round."""
    config: Mapping = msg.content["config"]
    shares = _client(context).unmask(
        _round(msg), list(config["survivors"]), list(config["dropped"])
    )
    del context.state[STATE_KEY]
    if "next-round" in config:  # fresh keys for the next round ride along
        public = _start(context, int(config["next-round"]))
        shares.update({f"next.{name}": key for name, key in public.items()})
    return Message(content=RecordDict({"secagg": ConfigRecord(shares)}), reply_to=msg)
