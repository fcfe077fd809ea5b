"""The ClientApp side of a secure round: messages in, SecAgg+ steps, messages out.

The protocol state sits in the node's `context.state`, which stays on the
hospital's machine (Flower keeps it in the SuperNode): the current round's
under STATE_KEY, deleted after its unmask step so no secret outlives its
round, and the next round's keys under NEXT_KEY from the masked upload on.
In steady state the next round's keys travel with the masked upload and its
shares with the unmask reply, so a round costs two exchanges, not four.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log

from medfed.client.secagg import SecAggClient, SecAggRefused
from medfed.shared_models.secagg.vector import flatten

STATE_KEY = "medfed-secagg"
NEXT_KEY = "medfed-secagg-next"
MASKED_KEY = "masked"


def _client(context: Context) -> SecAggClient:
    if STATE_KEY not in context.state.config_records:
        raise SecAggRefused("no secure-aggregation state on this node for the round")
    return SecAggClient(context.state.config_records[STATE_KEY])


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def _start(context: Context, server_round: int, slot: str) -> dict[str, bytes]:
    client, public = SecAggClient.start(context.run_id, server_round, str(context.node_id))
    context.state[slot] = client.state
    return public


def _forget(context: Context, slot: str) -> None:
    if slot in context.state.config_records:
        del context.state[slot]


def advertise(msg: Message, context: Context, weight: float) -> Message:
    """Fresh key pairs for the round; the public halves and the aggregation weight go back."""
    _forget(context, NEXT_KEY)
    public = _start(context, _round(msg), STATE_KEY)
    content = RecordDict(
        {
            "secagg": ConfigRecord(public),
            "metrics": MetricRecord({"aggregation-weight": weight}),
        }
    )
    return Message(content=content, reply_to=msg)


def _share(context: Context, config: Mapping, secagg: Mapping) -> ConfigRecord:
    """Encrypted shares of this hospital's secrets, one per neighbour ("to.<node>")."""
    xs = {key[2:]: int(value) for key, value in secagg.items() if key.startswith("x.")}
    neighbours = {
        key[5:]: (secagg[key], secagg[f"s-pk.{key[5:]}"])
        for key in secagg
        if key.startswith("c-pk.")
    }
    client = _client(context)
    sealed = client.share_keys(
        int(config["server-round"]),
        xs,
        neighbours,
        int(config["threshold"]),
        float(config["fraction"]),
        float(config["clipping-range"]),
        int(config["quantization-bits"]),
    )
    client.state["weight"] = float(config["weight"])  # what the coordinator weighs us by
    return ConfigRecord({f"to.{node}": ciphertext for node, ciphertext in sealed.items()})


def share(msg: Message, context: Context) -> Message:
    """The share exchange of a round that was not prepared during the previous one."""
    sealed = _share(context, msg.content["config"], msg.content["secagg"])
    return Message(content=RecordDict({"secagg": sealed}), reply_to=msg)


def masked_update(
    msg: Message,
    context: Context,
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    weight: float,
) -> tuple[ArrayRecord, int, ConfigRecord]:
    """The masked encoding of (trained - start) as one flat uint32 array, the count
    of clipped values, and this hospital's public keys for the next round.

    `start` holds the received global arrays, in order; `weight` is this
    hospital's aggregation weight now.
    """
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
    public = _start(context, _round(msg) + 1, NEXT_KEY)
    ahead = ConfigRecord({f"next.{name}": key for name, key in public.items()})
    return ArrayRecord({MASKED_KEY: Array(masked)}), clipped, ahead


def unmask(msg: Message, context: Context) -> Message:
    """One share per neighbour as the round's outcome requires, then forget the round;
    with the next round's plan attached, also that round's encrypted shares."""
    config: Mapping = msg.content["config"]
    shares = _client(context).unmask(
        _round(msg), list(config["survivors"]), list(config["dropped"])
    )
    _forget(context, STATE_KEY)
    content = RecordDict({"secagg": ConfigRecord(shares)})
    if "next-config" in msg.content.config_records and NEXT_KEY in context.state.config_records:
        context.state[STATE_KEY] = context.state.config_records[NEXT_KEY]
        _forget(context, NEXT_KEY)
        try:
            content["next-sealed"] = _share(
                context, msg.content["next-config"], msg.content["next-secagg"]
            )
        except (SecAggRefused, ValueError) as err:  # this round's shares still go back
            log(WARNING, "[medfed] not preparing the next secure round: %s", err)
            _forget(context, STATE_KEY)
    else:
        _forget(context, NEXT_KEY)
    return Message(content=content, reply_to=msg)
